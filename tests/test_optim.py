"""Per-part learning rates (projector_lr / vision_lr) reach the optimizer, for the SFT and the DPO trainer alike."""

from __future__ import annotations

import pytest

import videollm  # noqa: F401  (registers the Auto classes)
from videollm.data.sampling import SamplingSpec
from videollm.model.presets import build_tiny_model_and_processor
from videollm.model.trainable import TrainablePolicy, apply_trainable_policy, parameter_groups
from videollm.train.sft import VideoSFTConfig, VideoSFTTrainer


def _model(vision: str = "full"):
    model, processor = build_tiny_model_and_processor("stc", sampling=SamplingSpec(num_frames=4))
    return apply_trainable_policy(model, TrainablePolicy(vision=vision, projector="full", llm="full")), processor


def _rate_of(groups: list[dict], model) -> dict[str, float]:
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    return {name: rate[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def test_each_part_gets_its_rate_and_frame_embeddings_the_main_one():
    model, _ = _model()
    decay = {name for name, _ in model.named_parameters() if name.endswith("weight")}
    groups = parameter_groups(model, 1e-3, 0.1, decay, projector_lr=1e-4, vision_lr=1e-5)
    rates = _rate_of(groups, model)
    assert rates["model.projector.conv.weight"] == 1e-4
    assert rates["model.projector.frame_embedding.embedding.weight"] == 1e-3
    assert all(r == 1e-5 for n, r in rates.items() if n.startswith("model.vision_tower."))
    assert all(r == 1e-3 for n, r in rates.items() if n.startswith("model.language_model.") or n.startswith("lm_head"))
    assert sum(len(g["params"]) for g in groups) == len(rates)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(p) in no_decay for n, p in model.named_parameters() if p.requires_grad and n not in decay)


@pytest.mark.parametrize("projector_lr", [None, 2e-4])
def test_the_trainer_builds_its_optimizer_from_the_part_rates(tmp_path, projector_lr):
    model, processor = _model(vision="frozen")
    args = VideoSFTConfig(output_dir=str(tmp_path), learning_rate=1e-3, projector_lr=projector_lr, use_cpu=True, report_to="none")
    trainer = VideoSFTTrainer(model=model, args=args, processing_class=processor)
    optimizer = trainer.create_optimizer()
    rates = _rate_of(optimizer.param_groups, model)
    assert rates["model.projector.conv.weight"] == (projector_lr or 1e-3)
    assert rates["model.language_model.layers.0.self_attn.q_proj.weight"] == 1e-3
    assert not any(n.startswith("model.vision_tower.") for n in rates)
