"""Padding-free packing (videollm/data/packing.py): same loss and gradients as padded batches, same steps."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from videollm.data.dataset import VideoCollator
from videollm.data.packing import PackingCollator, dense_packing_warning
from videollm.data.sampling import SamplingSpec
from videollm.data.video import DecodedVideo
from videollm.model.attention import PACKED_SDPA, packed_segments
from videollm.model.presets import build_tiny_model_and_processor
from videollm.train.config import DataArguments, ModelArguments
from videollm.train.setup import load_or_build


def make_video(num_frames: int, seed: int) -> DecodedVideo:
    frames = torch.randint(0, 256, (num_frames, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return DecodedVideo(frames, list(range(num_frames)), [i / 8 for i in range(num_frames)], num_frames / 8, f"v{seed}")


SAMPLES = [
    ("What color is the square?", "red", 4),
    ("Which way does it move?", "left, then it stops near the edge", 6),
    ("Say hi.", "hi", 0),
    ("How many objects are there?", "two", 2),
    ("Describe the motion.", "a circle moves right slowly", 4),
    ("Is it moving?", "no", 3),
]


def features(processor) -> list[dict]:
    """Samples of different lengths, videos of 2 to 6 frames and one text-only sample."""
    encoded = []
    for seed, (question, answer, frames) in enumerate(SAMPLES):
        videos = [make_video(frames, seed)] if frames else []
        prefix = "<video>\n" if videos else ""
        messages = [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
        encoded.append(processor.encode(messages, videos, sample_id=str(seed)).as_features())
    return encoded


@pytest.fixture(scope="module", params=["sdpa", "eager", PACKED_SDPA])
def tiny(request):
    torch.manual_seed(0)
    return build_tiny_model_and_processor(
        "pool", sampling=SamplingSpec(num_frames=4), attn_implementation=request.param
    )


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_packed_row_layout(tiny):
    _, processor = tiny
    samples = features(processor)[:3]
    batch = PackingCollator()(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, sum(lengths))
    assert "attention_mask" not in batch
    expected_positions = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch["position_ids"][0], expected_positions)
    assert torch.equal(batch["input_ids"][0], torch.tensor([t for s in samples for t in s["input_ids"]]))
    assert batch["video_num_frames"].tolist() == [4, 6]  # the text-only sample has no video
    assert torch.equal(batch["pixel_values_videos"], torch.cat([samples[0]["pixel_values_videos"], samples[1]["pixel_values_videos"]]))
    # the same label tokens are scored: packing changes no token count the Trainer normalises by
    padded = VideoCollator(processor)(samples)
    assert int((batch["labels"][:, 1:] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())


def test_packed_equals_padded_loss_and_gradients(tiny):
    """fp32 on the CPU: the loss within 1e-5 and every gradient within 1e-5 (absolute) of the padded batch's."""
    model, processor = tiny
    model.train()
    samples = features(processor)
    padded_loss, padded_grads = loss_and_grads(model, VideoCollator(processor)(samples))
    packed_loss, packed_grads = loss_and_grads(model, PackingCollator()(samples))
    assert abs(packed_loss.item() - padded_loss.item()) < 1e-5
    assert any(g.abs().sum() > 0 for g in packed_grads)
    for packed, padded in zip(packed_grads, padded_grads, strict=True):
        assert torch.allclose(packed, padded, atol=1e-5, rtol=1e-4)


def test_packed_logits_equal_padded_logits(tiny):
    """No token attends across a sample boundary: each sample's logits are the ones it gets alone."""
    model, processor = tiny
    model.eval()
    samples = features(processor)[:3]
    with torch.no_grad():
        packed = model(**{k: v for k, v in PackingCollator()(samples).items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for sample in samples:
            alone = model(**{k: v for k, v in VideoCollator(processor)([sample]).items() if k != "labels"}).logits[0]
            assert torch.allclose(packed[start : start + alone.shape[0]], alone, atol=1e-5)
            start += alone.shape[0]


def test_dense_mask_warning_only_without_a_varlen_kernel():
    assert dense_packing_warning("flash_attention_2") is None
    assert dense_packing_warning(PACKED_SDPA) is None
    assert "dense block-diagonal mask" in dense_packing_warning("sdpa")


def test_packed_segments_are_the_samples_of_a_packed_row():
    query = torch.zeros(1, 2, 6, 4)
    assert packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0]]), query, query) == [(0, 3), (3, 5), (5, 6)]
    assert packed_segments(torch.tensor([[5, 6, 7, 0, 1, 2]]), query, query) == [(0, 3), (3, 6)]
    assert packed_segments(torch.arange(6)[None], query, query) is None  # one sample: plain sdpa
    assert packed_segments(None, query, query) is None
    assert packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0]] * 2), query.expand(2, -1, -1, -1), query) is None  # padded
    cached_keys = torch.zeros(1, 2, 9, 4)  # generation: the keys include the KV cache
    assert packed_segments(torch.tensor([[0, 1, 2, 0, 1, 0]]), query, cached_keys) is None


def test_sdpa_packed_attends_once_per_sample(monkeypatch):
    """On a packed row every attention call covers one sample (no dense mask over the row); padded batches and the
    samples' own forwards are plain sdpa, one call per layer."""
    import videollm.model.attention as attention

    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4), attn_implementation=PACKED_SDPA)
    samples = features(processor)[:3]
    lengths = [len(s["input_ids"]) for s in samples]
    layers = model.config.text_config.num_hidden_layers
    seen = []
    real = attention.sdpa_attention_forward

    llm_modules = set(map(id, model.model.language_model.modules()))

    def recording(module, query, key, value, attention_mask, **kwargs):
        if id(module) in llm_modules:  # the vision tower's attention (plain sdpa here) is not what this is about
            seen.append((query.shape[0], query.shape[2], attention_mask is None))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", recording)
    model.eval()
    with torch.no_grad():
        model(**{k: v for k, v in PackingCollator()(samples).items() if k != "labels"}, use_cache=False)
        assert seen == [(1, n, True) for n in lengths] * layers
        seen.clear()
        model(**{k: v for k, v in VideoCollator(processor)(samples).items() if k != "labels"})
    assert seen == [(3, max(lengths), False)] * layers  # padded: sdpa with the padding mask


def test_sdpa_packed_generates_like_sdpa():
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4))
    messages = [[{"role": "user", "content": "<video>\nWhat color is the square?"}], [{"role": "user", "content": "Say hi."}]]
    inputs = processor(messages, [[make_video(4, 0)], []])
    model.eval()
    plain = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    model.set_attn_implementation({"text_config": PACKED_SDPA})
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), plain)


def test_sdpa_packed_finds_the_samples_once_per_forward(monkeypatch):
    """The sample bounds of a packed row are found once per forward and handed to every layer (on a GPU each search
    is a host sync), and attention still runs per sample."""
    import videollm.model.attention as attention
    import videollm.model.modeling as modeling

    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4), attn_implementation=PACKED_SDPA)
    samples = features(processor)[:3]
    searches = []
    real = attention.sample_bounds

    def counting(position_ids):
        searches.append(position_ids)
        return real(position_ids)

    monkeypatch.setattr(modeling, "sample_bounds", counting)
    monkeypatch.setattr(attention, "sample_bounds", counting)
    model.eval()
    with torch.no_grad():
        packed = model(**{k: v for k, v in PackingCollator()(samples).items() if k != "labels"}, use_cache=False).logits
        assert len(searches) == 1
        searches.clear()
        padded = model(**{k: v for k, v in VideoCollator(processor)(samples).items() if k != "labels"}, use_cache=False)
    assert len(searches) == 1  # a padded batch is searched once too, and found not packed
    start = 0
    for row, sample in enumerate(samples):
        length = len(sample["input_ids"])
        assert torch.allclose(packed[0, start : start + length], padded.logits[row, :length], atol=1e-5)
        start += length


@pytest.mark.parametrize(("packing", "expected"), [(True, PACKED_SDPA), (False, "sdpa")])
def test_sft_setup_packs_with_sdpa_packed(packing, expected):
    model_args = ModelArguments(tiny=True, tune_llm="full", tune_projector="full")
    model, _ = load_or_build(model_args, DataArguments(packing=packing, num_frames=4), seed=0)
    assert model.config.text_config._attn_implementation == expected
    assert model.config.vision_config._attn_implementation == "sdpa"


class _Features(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def test_trainer_steps_and_losses_do_not_change(tmp_path):
    """Two HF Trainer runs, padded and packed, batch 2 x 2 accumulation steps: the same steps, losses and weights.

    SGD, not Adam: Adam divides by the gradient's own size, so a parameter whose true gradient is zero (a key bias)
    moves by lr x (rounding noise / eps) differently in each run; SGD keeps the comparison to the gradients.
    """
    runs = {}
    for name, collator in (("padded", None), ("packed", PackingCollator())):
        torch.manual_seed(0)
        model, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4))
        args = TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=0.1, optim="sgd", logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, seed=0,
            dataloader_drop_last=True, disable_tqdm=True,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=_Features(features(processor) * 2),
            data_collator=collator or VideoCollator(processor),
        )  # fmt: skip
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = (trainer.state.global_step, losses, [p.detach().clone() for p in model.parameters()])
    (padded_steps, padded_losses, padded_weights), (packed_steps, packed_losses, packed_weights) = runs.values()
    assert packed_steps == padded_steps == 2
    assert packed_losses == pytest.approx(padded_losses, abs=1e-5)
    for packed, padded in zip(packed_weights, padded_weights, strict=True):
        assert torch.allclose(packed, padded, atol=1e-5)
