"""The benchmarks measure what they say: the model-FLOP count behind MFU, the peer's share of the work, and a GPU run
script whose flags and carried wheels exist. Small models on the CPU; no benchmark is run here."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_sft  # noqa: E402

from videollm.data.dataset import VideoCollator  # noqa: E402
from videollm.data.processor import IGNORE_INDEX  # noqa: E402

SMALL = {**bench_sft.PRESETS["cpu"], "frames": 2, "batch": 1}


def small_args(attn: str = "eager") -> argparse.Namespace:
    return argparse.Namespace(device="cpu", attn=attn, gradient_checkpointing=False, mixed_precision=False)


@pytest.fixture(scope="module")
def ours_and_samples():
    torch.manual_seed(0)
    model, processor = bench_sft.build_ours(SMALL, small_args())
    return model.train(), processor, bench_sft.make_samples(SMALL, processor)


def test_step_flops_by_hand():
    """A configuration small enough to count on paper: LLM d=8, 1 layer, 2 heads (1 KV head), MLP 16, vocab 10;
    tower d=4, 2 layers (the projector reads layer 1 of 2), MLP 8, 2x2 patches; one sample of 5 tokens, 2 scored."""
    preset = {
        "llm": {"hidden": 8, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 16, "vocab": 10},
        "vision": {"hidden": 4, "layers": 2, "intermediate": 8, "image": 4, "patch": 2},
    }
    sample = {"input_ids": [0] * 5, "labels": [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8], "video_num_frames": [3]}
    # LLM weights: q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 3 x 8x16 = 64+32+32+64+384 = 576; 4N a token over 5 tokens
    llm = 4 * 576 * 5
    lora = 6 * 100 * 5  # 100 LoRA parameters (trained: forward, backward to activations and to the weights)
    attention = 4 * 8 * 5 * 5 * 3  # forward QK^T + PV = 4·d·s², backward twice that
    head = 4 * 8 * 10 * 2  # forward and backward to activations at the 2 scored positions
    # tower, forward only, 1 of 2 layers: q,k,v,o 4x4 + fc1/fc2 4x8 = 128 weights, 4 patches, plus attention 4·d·p²
    tower = 3 * (2 * 128 * 4 + 4 * 4 * 4 * 4)
    assert bench_sft.step_flops(preset, [sample], with_vision=True, lora_params=100) == llm + lora + attention + head + tower
    assert bench_sft.step_flops(preset, [sample], with_vision=False, lora_params=100) == llm + lora + attention + head


def test_step_flops_match_torch_flop_counter(ours_and_samples):
    """Ours, one unpadded sample, eager attention (plain matmuls that torch's counter sees): the counted FLOPs of a
    forward with labels and a backward match the benchmark's model FLOPs to within what the formula leaves out (the
    projector, the patch embedding)."""
    model, processor, samples = ours_and_samples
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    batch = bench_sft.on(VideoCollator(processor)(samples), "cpu", torch.float32)
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    counted = counter.get_total_flops()
    expected = bench_sft.step_flops(SMALL, samples, with_vision=True, lora_params=lora)
    assert expected <= counted <= 1.02 * expected, (counted, expected)


def test_peer_gets_the_same_work(ours_and_samples):
    """Same tokens per sample, one more visual slot for the peer's newline in place of one prompt token, the same
    scored positions, the same trainable parameter count (LoRA + projector) and a frozen tower on both sides."""
    model, processor, samples = ours_and_samples
    batch = bench_sft.peer_batch(samples, processor)
    visual = processor.layout.count(SMALL["frames"])
    for row, labels, sample in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), samples, strict=True):
        assert len(row) == len(sample["input_ids"])
        assert row.count(processor.video_token_id) == visual + 1
        assert [i for i, t in enumerate(labels) if t != IGNORE_INDEX] == [
            i for i, t in enumerate(sample["labels"]) if t != IGNORE_INDEX
        ]
    image_token = next(i for i in processor.tokenizer.all_special_ids if i != processor.video_token_id)
    torch.manual_seed(0)
    peer = bench_sft.build_peer(SMALL, small_args(), processor.video_token_id, image_token)
    grid = SMALL["vision"]["image"] // SMALL["vision"]["patch"]
    pixels = torch.stack([s["pixel_values_videos"] for s in samples])
    config = peer.base_model.model.config
    with torch.no_grad():
        features = peer.base_model.model.model.get_video_features(
            pixel_values_videos=pixels, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output  # fmt: skip
    # the peer's 2x2-pooled frames and its newline fill exactly its video slots: visual + 1 = ours + one prompt token
    assert features.shape[1] == SMALL["frames"] * (-(-grid // 2)) ** 2 + 1 == visual + 1
    # the same tower layer's output: the peer takes hidden_states[-2] of the whole tower, ours builds the tower up to
    # that layer and takes its last
    ours_config = model.base_model.model.config
    assert config.vision_feature_layer == bench_sft.VISION_FEATURE_LAYER == -2
    assert ours_config.vision_config.num_hidden_layers == SMALL["vision"]["layers"] - 1
    assert ours_config.vision_feature_layer == -1

    def trainable(m, words):
        return sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and any(w in n for w in words))

    assert trainable(peer, ["lora_"]) == trainable(model, ["lora_"]) > 0
    # the same 2-layer MLP trains on both sides; ours also trains its projector's frame-position embedding (an add per
    # token: no FLOPs to speak of)
    assert trainable(peer, ["multi_modal_projector"]) == trainable(model, ["projector.modules_to_save.default.linear_"]) > 0
    assert trainable(model, ["projector"]) - trainable(model, ["projector.modules_to_save.default.linear_"]) == trainable(
        model, ["frame_embedding"]
    )
    assert trainable(peer, ["vision_tower"]) == trainable(model, ["vision_tower"]) == 0
    assert {n for n, p in peer.named_parameters() if p.requires_grad} <= {
        n for n, p in peer.named_parameters() if "lora_" in n or "multi_modal_projector" in n
    }


@pytest.mark.parametrize(
    "name, tflops",
    [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.4)],
)
def test_peak_tflops_by_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert bench_sft.peak_tflops(argparse.Namespace(peak_tflops=None, device="cuda")) == tflops


def gpu_script_commands() -> list[list[str]]:
    """The bench_sft.py command lines of bench/gpu_checks.sh, continuation lines joined, $out as a placeholder."""
    text = (BENCH / "gpu_checks.sh").read_text().replace("\\\n", " ")
    return [shlex.split(line.split("bench/bench_sft.py", 1)[1].replace("$out", "OUT")) for line in text.splitlines()
            if "bench/bench_sft.py" in line and not line.lstrip().startswith("#")]  # fmt: skip


def test_gpu_script_flags_parse(monkeypatch):
    commands = gpu_script_commands()
    assert len(commands) >= 3
    for argv in commands:
        monkeypatch.setattr(sys, "argv", ["bench_sft.py", *argv])
        args = bench_sft.parse_args()
        assert args.preset in bench_sft.PRESETS


def test_every_package_the_gpu_checks_import_is_carried():
    """The GPU image has transformers 5.17 (videollm needs newer), no trl, datasets or PyAV: each package the checks
    import beyond the image's is carried, at the version installed here (where the CPU suite passes)."""
    carried = re.search(r'^CARRIED="([^"]+)"', (BENCH / "fetch_gpu_wheels.sh").read_text(), re.MULTILINE).group(1).split()
    imported = re.search(r"python3 -c \"import ([^;]+);", (BENCH / "gpu_checks.sh").read_text()).group(1)
    needed = {name.strip() for name in imported.split(",")} - {"torch", "videollm", "videollm.train.sft"}
    assert needed <= set(carried) and {"dill", "multiprocess"} <= set(carried)  # datasets' own imports
    for name in carried:
        importlib.metadata.version(name)  # installed here, so the script can read its version


def test_dpo_bench_builds_a_preset_model(tmp_path, monkeypatch):
    """bench_dpo.py --preset reuses bench_sft.build_ours, which reads switches bench_dpo's flags do not define."""
    import bench_dpo

    monkeypatch.setattr(sys, "argv", ["bench_dpo.py", "--preset", "cpu", "--frames", "2", "--pairs", "1"])
    args = bench_dpo.parse_args()
    model, processor = bench_dpo.build_model(args, tmp_path)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
