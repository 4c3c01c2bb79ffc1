"""SFT throughput against the peer users would pick today: transformers' LLaVA-OneVision with the same LoRA.

    python bench/bench_sft.py                                          # CPU, small-but-real shapes
    python bench/bench_sft.py --device cuda --preset qwen2.5-0.5b      # SigLIP-so400m + Qwen2.5-0.5B shapes, bf16
    python bench/bench_sft.py --device cuda --preset qwen2.5-7b --json bench/results/sft_7b.json
    python bench/bench_sft.py --device cuda --preset qwen2.5-7b --frames 32 --variants "ours, padded" \
        --gradient_checkpointing          # peak GPU memory of ours alone (the peer is not built)

Both sides get the same work: a SigLIP vision tower of the same shape (frozen), a 2-layer MLP projector (trained), a
Qwen2 LLM of the same shape under the same LoRA (r, alpha, dropout, target layers), the same frames, the same visual
token count (LLaVA-OneVision pools every frame's patch grid 2x2 and appends one newline token per video; ours pools to
the same grid with the `pool` projector and gets the newline's slot as one more prompt token), the same prompts and
answer lengths, and the same step: forward with labels, backward, AdamW. Random weights; step time does not depend on
their values.

Table 1 (training step, batches prepared): the peer's step (`LlavaOnevisionForConditionalGeneration`, padded batch,
transformers' loss over full-vocabulary logits) against ours padded, ours packed (`PackingCollator`; with `--attn sdpa`
ours runs `sdpa_packed`, which attends per sample on packed rows and is sdpa on padded ones), and both reading
tower features from the cache (samples as `CachedFeatureDataset` gives them: no vision forward). Table 2 (CPU only,
`--e2e_videos`): whole training iterations from video files: the peer and ours decoding in the loop (`ConversationDataset`, the same decoder
for both), against ours reading the feature cache (`CachedFeatureDataset`), with the share of each iteration spent
fetching and collating the batch (what `data_wait_fraction` reports in training logs, here without DataLoader
workers). Variants run round-robin, one step each per round; the speed-ups are medians over rounds of the two times of
the same round, so a change of machine load between rounds cancels out.

Model FLOPs per step (the same number for every variant that runs the tower; the cached variant drops the vision term):
LoRA on a frozen LLM is 4N per token (forward 2N, backward to the activations 2N) plus 6 per LoRA parameter; attention
12·layers·hidden·s² per sample of length s (forward 4·hidden·s² a layer for QK^T and PV; the backward needs the
gradients of both operands of each, all activations, so twice that: not halved for causality); the LM
head 4·hidden·vocab per scored token (what the loss needs: the peer's logits at unscored positions are waste); the
vision forward 2N per patch plus its attention, up to the layer the projector reads (the layers after it, which the
peer runs and ours cuts, are waste too). The projector is left out (under 1%). MFU needs the accelerator's peak
(known for H100/H200/A100, else `--peak_tflops`); with `--gradient_checkpointing` the recomputed forward is not counted
(model FLOPs, not hardware FLOPs). On a GPU each variant's peak allocated memory is measured over one extra step,
with every model this run built resident: `--variants` without a peer variant builds ours only.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from timing import device_name, round_robin

from videollm.data.dataset import ConversationDataset, VideoCollator
from videollm.data.feature_cache import (
    CachedFeatureDataset,
    FeatureCache,
    FeatureCacheWriter,
    cache_identity,
    encode_videos,
)
from videollm.data.formats import load_conversations
from videollm.data.packing import PackingCollator
from videollm.data.processor import IGNORE_INDEX
from videollm.data.sampling import SamplingSpec
from videollm.data.tokenizer import build_tiny_tokenizer
from videollm.data.video import write_video
from videollm.model.attention import PACKED_SDPA
from videollm.model.builder import build_model_and_processor
from videollm.model.trainable import TrainablePolicy
from videollm.train.hardware import Hardware, upcast_trainable_parameters

SO400M = {"hidden": 1152, "layers": 27, "heads": 16, "intermediate": 4304, "image": 384, "patch": 14}
PRESETS = {
    # A 4-layer 256-wide LM over a 4-layer SigLIP-shaped tower at 96 px; the vocabulary keeps the LM head's share of
    # the LLM FLOPs near Qwen2.5-0.5B's (about 40%).
    "cpu": {
        "llm": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 1024, "vocab": 8192, "tie": False},
        "vision": {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024, "image": 96, "patch": 8},
        "frames": 8, "batch": 4, "prompt": 24, "answers": (16, 96), "lora_r": 16, "dtype": "float32",
    },
    "qwen2.5-0.5b": {
        "llm": {"hidden": 896, "layers": 24, "heads": 14, "kv_heads": 2, "intermediate": 4864, "vocab": 151936, "tie": True},
        "vision": SO400M, "frames": 16, "batch": 4, "prompt": 48, "answers": (32, 256), "lora_r": 64, "dtype": "bfloat16",
    },
    "qwen2.5-7b": {
        "llm": {"hidden": 3584, "layers": 28, "heads": 28, "kv_heads": 4, "intermediate": 18944, "vocab": 152064, "tie": False},
        "vision": SO400M, "frames": 16, "batch": 1, "prompt": 48, "answers": (32, 256), "lora_r": 64, "dtype": "bfloat16",
    },
}  # fmt: skip
# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VISION_FEATURE_LAYER = -2
PEER_STEP = "peer: LLaVA-OneVision, padded"
STEP_VARIANTS = (PEER_STEP, "ours, padded", "ours, packed", "ours, padded, feature cache", "ours, packed, feature cache")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: the preset's")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: the preset's)")
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default: the preset's)")
    parser.add_argument("--vocab_size", type=int, default=None, help="LLM vocabulary (default: the preset's)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant, after 2 warm-up rounds")
    parser.add_argument(
        "--attn", default=None, help="attention of both models (default: flash_attention_2 on a GPU when installed, else sdpa)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--e2e_videos", type=int, default=None, help="CPU: videos for the end-to-end table (0: skip)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="accelerator peak for MFU when not known")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one step per variant")
    parser.add_argument(
        "--variants", nargs="+", default=None, choices=STEP_VARIANTS, metavar="NAME",
        help=f"step variants to run (default: all; the peer is built only when it runs): {' | '.join(STEP_VARIANTS)}",
    )  # fmt: skip
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="recompute each LLM layer's activations in the backward"
    )
    parser.add_argument(
        "--mixed_precision", action="store_true",
        help="train as the recipes do with bf16: trained parameters in fp32, frozen ones in --dtype, each step under "
        "autocast to --dtype (default: every weight in --dtype, no autocast)",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    return parser.parse_args()


# ---- the two models -----------------------------------------------------------------------------------------------
def vision_config(shape: dict) -> AutoConfig:
    return AutoConfig.for_model(
        "siglip_vision_model", hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], image_size=shape["image"],
        patch_size=shape["patch"], vision_use_head=False,
    )  # fmt: skip


def text_config(shape: dict) -> AutoConfig:
    return AutoConfig.for_model(
        "qwen2", vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=32768, tie_word_embeddings=shape["tie"], rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )  # fmt: skip


def build_ours(preset: dict, args: argparse.Namespace):
    grid = preset["vision"]["image"] // preset["vision"]["patch"]
    pooled = -(-grid // 2)  # LLaVA-OneVision's ceil(grid / 2)
    dtype = getattr(torch, preset["dtype"])
    with torch.device(args.device):  # weights are made where they run, in their dtype: a 7B model never sits in host RAM
        model, processor = build_model_and_processor(
            vision_config(preset["vision"]), text_config(preset["llm"]), tokenizer=build_tiny_tokenizer(),
            projector_type="pool", pool_output_size=[preset["frames"], pooled, pooled],
            vision_feature_layer=VISION_FEATURE_LAYER, sampling=SamplingSpec(num_frames=preset["frames"]),
            attn_implementation=PACKED_SDPA if args.attn == "sdpa" else args.attn, dtype=dtype,
        )  # fmt: skip
    # The policy's own LoRA config and switches (apply_trainable_policy refuses random frozen parts, which a benchmark
    # is made of).
    policy = TrainablePolicy(vision="frozen", projector="full", llm="lora", lora_r=preset["lora_r"], lora_alpha=2 * preset["lora_r"])
    model.model.vision_tower.requires_grad_(False)
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    model = get_peft_model(model, policy.lora_config())
    return with_precision(with_checkpointing(model.to(args.device, dtype), args), args), processor


def build_peer(preset: dict, args: argparse.Namespace, video_token_id: int, image_token_id: int):
    config = LlavaOnevisionConfig(
        vision_config=vision_config(preset["vision"]), text_config=text_config(preset["llm"]),
        video_token_index=video_token_id, image_token_index=image_token_id, vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="full", tie_word_embeddings=preset["llm"]["tie"],
    )  # fmt: skip
    config._attn_implementation = args.attn
    dtype = getattr(torch, preset["dtype"])
    with torch.device(args.device):
        model = LlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
    lora = LoraConfig(
        r=preset["lora_r"], lora_alpha=2 * preset["lora_r"], lora_dropout=0.05,
        target_modules=rf".*\.language_model\..*\.({'|'.join(LORA_TARGETS)})", modules_to_save=["multi_modal_projector"],
    )  # fmt: skip
    return with_precision(with_checkpointing(get_peft_model(model, lora).to(args.device, dtype), args), args)


def with_checkpointing(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def with_precision(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """With --mixed_precision, the recipes' weights: what trains in fp32 (the optimizer's master copy)."""
    if args.mixed_precision:
        upcast_trainable_parameters(model)
    return model


# ---- the same samples for both --------------------------------------------------------------------------------------
def make_samples(preset: dict, processor, seed: int = 0) -> list[dict]:
    """Token ids, labels and frames of `batch` samples: prompt text, the video's tokens, more prompt, the answer."""
    generator = torch.Generator().manual_seed(seed)
    special = set(processor.tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(len(processor.tokenizer)) if i not in special])
    visual = processor.layout.count(preset["frames"])
    size = preset["vision"]["image"]
    low, high = preset["answers"]
    samples = []
    for _ in range(preset["batch"]):
        answer = int(torch.randint(low, high + 1, (), generator=generator))
        text = ordinary[torch.randint(len(ordinary), (preset["prompt"] + 1 + answer,), generator=generator)].tolist()
        half = preset["prompt"] // 2
        # ours: one more prompt token in the slot of the peer's per-video newline token
        ids = text[:half] + [processor.video_token_id] * visual + text[half:]
        labels = [IGNORE_INDEX] * (len(ids) - answer) + ids[len(ids) - answer :]
        frames = torch.randn(preset["frames"], 3, size, size, generator=generator)
        samples.append({"input_ids": ids, "labels": labels, "pixel_values_videos": frames, "video_num_frames": [preset["frames"]]})
    return samples


def peer_batch(samples: list[dict], processor) -> dict:
    """The peer's padded batch: the same tokens, with the newline's slot given to the video (visual + 1 tokens)."""
    rows, label_rows = [], []
    for sample in samples:
        ids, labels = list(sample["input_ids"]), list(sample["labels"])
        first_text_after = max(i for i, t in enumerate(ids) if t == processor.video_token_id) + 1
        ids[first_text_after] = processor.video_token_id  # the newline token of LLaVA-OneVision's video layout
        labels[first_text_after] = IGNORE_INDEX
        rows.append(ids)
        label_rows.append(labels)
    longest = max(len(r) for r in rows)
    pad = processor.tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([r + [pad] * (longest - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows]),
        "labels": torch.tensor([r + [IGNORE_INDEX] * (longest - len(r)) for r in label_rows]),
        "pixel_values_videos": torch.stack([s["pixel_values_videos"] for s in samples]),
    }
    return batch


def on(batch: dict, device: str, dtype: torch.dtype) -> dict:
    moved = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device)
            if value.is_floating_point():
                value = value.to(dtype)
        moved[key] = value
    return moved


# ---- FLOPs ----------------------------------------------------------------------------------------------------------
def step_flops(preset: dict, samples: list[dict], with_vision: bool, lora_params: int) -> float:
    """Model FLOPs of one training step over `samples` (see the module docstring; tests/test_bench.py checks the count
    against torch's FLOP counter on a small model)."""
    llm, vision = preset["llm"], preset["vision"]
    d, layers, kv = llm["hidden"], llm["layers"], llm["hidden"] // llm["heads"] * llm["kv_heads"]
    body = layers * (2 * d * d + 2 * d * kv + 3 * d * llm["intermediate"])
    lengths = [len(s["input_ids"]) for s in samples]
    scored = sum(sum(1 for t in s["labels"][1:] if t != IGNORE_INDEX) for s in samples)
    flops = (4 * body + 6 * lora_params) * sum(lengths)
    # attention: forward QK^T and PV, 2·s²·d each; backward, the gradients of both operands of each (dQ, dK, dP, dV):
    # twice the forward, whatever is frozen, since no weight is involved
    flops += 12 * layers * d * sum(n * n for n in lengths)
    flops += 4 * d * llm["vocab"] * scored
    if with_vision:
        dv, patches = vision["hidden"], (vision["image"] // vision["patch"]) ** 2
        needed_layers = vision["layers"] + 1 + VISION_FEATURE_LAYER
        tower = needed_layers * (4 * dv * dv + 2 * dv * vision["intermediate"])
        frames = sum(s["video_num_frames"][0] for s in samples)
        flops += frames * (2 * tower * patches + 4 * needed_layers * dv * patches * patches)
    return float(flops)


def peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if not args.device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((value for key, value in PEAK_TFLOPS.items() if key in name), None)


# ---- timing ---------------------------------------------------------------------------------------------------------
def train_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, autocast: torch.dtype | None = None
) -> None:
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def paired_ratio(reference: list[float], variant: list[float]) -> float:
    """Median over rounds of reference time / variant time: both ran in the same round, so a load change between
    rounds cancels out (on a shared machine the medians of the two columns can come from different loads)."""
    return statistics.median(r / v for r, v in zip(reference, variant, strict=True))


def profile(variants: dict[str, Callable[[], None]]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, step in variants.items():
        with torch_profile(activities=activities) as prof:
            step()
        print(f"\n### profile: {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def peak_memory_gib(step: Callable[[], None]) -> float:
    """Peak allocated GPU memory over one call of `step`, resident weights and optimizer state included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def step_table(preset: dict, args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, preset["dtype"])
    names = [name for name in STEP_VARIANTS if args.variants is None or name in args.variants]
    torch.manual_seed(0)
    ours, processor = build_ours(preset, args)
    ours.train()
    samples = make_samples(preset, processor)
    collators = {
        "ours, padded": lambda: VideoCollator(processor)(samples),
        "ours, packed": lambda: PackingCollator()(samples),
        "ours, padded, feature cache": lambda: VideoCollator(processor)(cached_samples()),
        "ours, packed, feature cache": lambda: PackingCollator()(cached_samples()),
    }

    @functools.cache  # tower features of the samples, encoded once for both cached variants
    def cached_samples() -> list[dict]:
        with torch.no_grad():
            frames = torch.cat([s["pixel_values_videos"] for s in samples]).to(args.device, dtype)
            cached = encode_videos(ours, frames, [preset["frames"]] * len(samples), "tower")
        return [{**s, "pixel_values_videos": None, "video_frame_features": c} for s, c in zip(samples, cached)]

    autocast = dtype if args.mixed_precision else None
    variants = {}
    ours_optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    for name in names:
        if name == PEER_STEP:
            image_token = next(i for i in processor.tokenizer.all_special_ids if i != processor.video_token_id)
            torch.manual_seed(0)
            peer = build_peer(preset, args, processor.video_token_id, image_token).train()
            peer_optimizer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-5)
            batch = on(peer_batch(samples, processor), args.device, dtype)
            variants[name] = lambda m=peer, o=peer_optimizer, b=batch: train_step(m, o, b, autocast)
        else:
            batch = on(collators[name](), args.device, dtype)
            variants[name] = lambda b=batch: train_step(ours, ours_optimizer, b, autocast)
    if args.profile:
        profile(variants)
    times = round_robin(variants, args.device, args.steps)
    peaks = {name: peak_memory_gib(step) for name, step in variants.items()} if args.device.startswith("cuda") else {}

    lora_params = sum(p.numel() for n, p in ours.named_parameters() if "lora_" in n)
    tokens = sum(len(s["input_ids"]) for s in samples)
    peak = peak_tflops(args)
    peer_times = times.get(PEER_STEP)
    rows = []
    for name, values in times.items():
        seconds = statistics.median(values)
        flops = step_flops(preset, samples, with_vision="feature cache" not in name, lora_params=lora_params)
        rows.append({
            "variant": name, "ms_per_step": 1000 * seconds, "samples_per_s": len(samples) / seconds,
            "tokens_per_s": tokens / seconds,
            "speedup_vs_peer": paired_ratio(peer_times, values) if peer_times else None,
            "model_tflop_per_step": flops / 1e12, "achieved_tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / (peak * 1e12) if peak else None, "peak_memory_gib": peaks.get(name),
            # the target is in GB (10^9 bytes): 24 GB is 22.35 GiB
            "peak_memory_gb": peaks[name] * 2**30 / 1e9 if name in peaks else None,
            "ms_all_steps": [1000 * v for v in values],
        })  # fmt: skip
    return rows


# ---- end to end from video files (CPU) ------------------------------------------------------------------------------
def moving_square(count: int, size: int, seed: int) -> np.ndarray:
    """A drifting colour gradient with a square crossing it: content that encodes like real video, unlike noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    frames = np.empty((count, size, size, 3), dtype=np.uint8)
    side, colour = size // 6, rng.integers(0, 256, 3)
    for i in range(count):
        phase = i / count
        frames[i, ..., 0] = 255 * ((x + phase) % 1.0)
        frames[i, ..., 1] = 255 * ((y + 2 * phase) % 1.0)
        frames[i, ..., 2] = 128
        top, left = int((size - side) * phase), int((size - side) * (1 - phase))
        frames[i, top : top + side, left : left + side] = colour
    return frames


def e2e_table(preset: dict, args: argparse.Namespace, count: int) -> tuple[list[dict], dict]:
    """Whole iterations (fetch `batch` samples, collate, step) decoding videos in the loop vs reading the cache."""
    dtype = getattr(torch, preset["dtype"])
    torch.manual_seed(0)
    model, processor = build_ours(preset, args)
    model.train()
    processor.decode_timeout = None  # decode in this process: both variants share the same 2 cores either way
    rng = np.random.default_rng(0)
    words = ["left", "right", "red", "blue", "square", "circle", "moves", "then", "stops", "slowly", "fast", "the"]
    low, high = preset["answers"]
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        (root / "videos").mkdir()
        lines = []
        for i in range(count):
            clip = moving_square(64, 128, seed=i)
            write_video(root / "videos" / f"clip{i}.mp4", clip, fps=16.0)
            answer = " ".join(rng.choice(words, size=int(rng.integers(low // 2, high // 2 + 1))))
            conversation = [{"from": "human", "value": "<video>\nWhat happens in the video?"}, {"from": "gpt", "value": answer}]
            lines.append(json.dumps({"id": str(i), "video": f"videos/clip{i}.mp4", "conversations": conversation}))
        (root / "train.jsonl").write_text("\n".join(lines) + "\n")
        records = load_conversations(root / "train.jsonl", video_root=root)

        start = time.perf_counter()
        writer = FeatureCacheWriter(root / "cache", cache_identity(model, processor, "tower"), video_root=root)
        for record in records:
            video = processor.load_video(record.videos[0])
            pixels = processor.pixel_values(video).to(args.device, dtype)
            writer.add(record.videos[0], encode_videos(model, pixels, [len(video.indices)], "tower")[0], video)
        writer.close()
        build_seconds = time.perf_counter() - start
        cache = FeatureCache.open(root / "cache", model, processor, video_root=root)

        decoded = ConversationDataset(records, processor)
        cached = CachedFeatureDataset(records, processor, cache)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        image_token = next(i for i in processor.tokenizer.all_special_ids if i != processor.video_token_id)
        torch.manual_seed(0)
        peer = build_peer(preset, args, processor.video_token_id, image_token).train()
        peer_optimizer = torch.optim.AdamW([p for p in peer.parameters() if p.requires_grad], lr=1e-5)
        batch_size = preset["batch"]

        fetch_seconds: dict[str, list[float]] = {}

        def iterations(name, dataset, collator, trained=model, trained_optimizer=optimizer) -> Callable[[], None]:
            """One training iteration per call over consecutive samples (wrapping around), as a DataLoader would; the
            time spent fetching and collating the batch (the training loop's wait for data) is kept per call."""
            positions = itertools.count()
            fetches = fetch_seconds.setdefault(name, [])

            def iteration() -> None:
                start = time.perf_counter()
                batch = on(collator([dataset[next(positions) % len(dataset)] for _ in range(batch_size)]), args.device, dtype)
                fetches.append(time.perf_counter() - start)
                train_step(trained, trained_optimizer, batch, dtype if args.mixed_precision else None)

            return iteration

        # Packing pays off when attention runs per sample (flash-attention's varlen kernel, ours `sdpa_packed`); eager
        # gets a dense block-diagonal mask over the whole packed row, which costs more than the padding it saves.
        packed = args.attn.startswith("flash") or args.attn == "sdpa"
        layout = "packed" if packed else "padded"
        tokens_collator = PackingCollator() if packed else VideoCollator(processor)
        names = ("peer: decode videos + padded step", f"decode videos + {layout} step", f"feature cache + {layout} step")
        variants = {
            names[0]: iterations(names[0], decoded, lambda features: peer_batch(features, processor), peer, peer_optimizer),
            names[1]: iterations(names[1], decoded, tokens_collator),
            names[2]: iterations(names[2], cached, tokens_collator),
        }
        times = round_robin(variants, args.device, args.steps)
        cache_bytes = sum(f.stat().st_size for f in (root / "cache").rglob("*.safetensors"))
    base, peer_times = times[f"decode videos + {layout} step"], times["peer: decode videos + padded step"]
    rows = [
        {"variant": name, "ms_per_step": 1000 * statistics.median(v), "samples_per_s": batch_size / statistics.median(v),
         "speedup_vs_decoding": paired_ratio(base, v), "speedup_vs_peer": paired_ratio(peer_times, v),
         "data_wait_fraction": sum(fetch_seconds[name][-len(v):]) / sum(v), "ms_all_steps": [1000 * x for x in v]}
        for name, v in times.items()
    ]  # fmt: skip
    info = {"videos": count, "clip": "64 frames 128x128 h264", "cache_build_s": build_seconds, "cache_mib": cache_bytes / 2**20}
    return rows, info


def main() -> None:
    args = parse_args()
    if args.attn is None:
        args.attn = Hardware.detect(use_cpu=not args.device.startswith("cuda")).attention(None, packing=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = {**PRESETS[args.preset], "llm": dict(PRESETS[args.preset]["llm"])}
    for key, value in (("dtype", args.dtype), ("batch", args.batch), ("frames", args.frames)):
        if value is not None:
            preset[key] = value
    if args.vocab_size:
        preset["llm"]["vocab"] = args.vocab_size
    llm, vision = preset["llm"], preset["vision"]
    header = (
        f"{date.today()}, device {args.device} ({device_name(args.device)}), "
        f"{torch.get_num_threads()} threads, {preset['dtype']}{' mixed precision' if args.mixed_precision else ''}, attn {args.attn}; preset {args.preset}: LLM {llm['layers']}x{llm['hidden']} "
        f"vocab {llm['vocab']}, vision {vision['layers']}x{vision['hidden']} at {vision['image']}px/patch {vision['patch']}, "
        f"{preset['frames']} frames, batch {preset['batch']}, answers {preset['answers'][0]}-{preset['answers'][1]} tokens, "
        f"LoRA r={preset['lora_r']}{', gradient checkpointing' if args.gradient_checkpointing else ''}; median of {args.steps} steps"
    )  # fmt: skip
    print(header)
    rows = step_table(preset, args)
    print("\n| step | ms / step | samples/s | tokens/s | x peer | model TFLOP/s | MFU | peak GPU memory |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        ratio = f"{r['speedup_vs_peer']:.2f}x" if r["speedup_vs_peer"] is not None else "n/a"
        memory = f"{r['peak_memory_gib']:.2f} GiB ({r['peak_memory_gb']:.2f} GB)" if r["peak_memory_gib"] is not None else "n/a"
        print(f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{ratio} | {r['achieved_tflops']:.4f} | {mfu} | {memory} |")  # fmt: skip
    result = {"header": header, "preset": args.preset, "shapes": preset, "device": args.device, "step": rows}

    e2e_videos = args.e2e_videos if args.e2e_videos is not None else (8 if args.device == "cpu" else 0)
    if e2e_videos:
        e2e_rows, info = e2e_table(preset, args, e2e_videos)
        print(f"\nEnd to end from {info['videos']} video files ({info['clip']}), decoding in the training process; "
              f"cache built in {info['cache_build_s']:.1f} s, {info['cache_mib']:.1f} MiB")  # fmt: skip
        print("\n| iteration | ms / step | samples/s | waiting for data | x ours decoding | x peer decoding |")
        print("|---|---|---|---|---|---|")
        for r in e2e_rows:
            print(f"| {r['variant']} | {r['ms_per_step']:.1f} | {r['samples_per_s']:.2f} | {100 * r['data_wait_fraction']:.0f}% | "
                  f"{r['speedup_vs_decoding']:.2f}x | {r['speedup_vs_peer']:.2f}x |")  # fmt: skip
        result["end_to_end"] = {"rows": e2e_rows, **info}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
