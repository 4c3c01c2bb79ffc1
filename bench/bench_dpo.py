"""DPO step time over SFT step time on the same chosen + rejected tokens (target: <= 1.1x).

    python bench/bench_dpo.py                                  # tiny model on CPU
    python bench/bench_dpo.py --device cuda --llm_hidden 1024 --llm_layers 8 --frames 16 --pairs 4
    python bench/bench_dpo.py --preset qwen2.5-0.5b --frames 4 --pairs 1      # real shapes (bench_sft.py's presets)

Both steps train the same LoRA (vision tower and projector frozen; with `--preset`, bench_sft.py's model: frozen
tower, trained projector) on the same 2B sequences (B pairs: prompt with the
video + chosen, prompt with the video + rejected); each step is forward, backward and an AdamW update.
- sft: every sequence is a plain SFT sample, so each one encodes its own copy of the video (2B encodings).
- dpo: VideoDPOTrainer.compute_loss: the B videos are encoded once; a no-grad reference forward (LoRA disabled)
  runs over the 2B sequences besides the policy forward and backward.
- dpo, cached reference: reference log-probs precomputed (precompute_ref_log_probs: the step has no reference pass).
- dpo, features cached: what `data_tools/cache_features.py --recipe dpo` stores for this model: projector outputs
  when the projector is frozen (the step runs no vision module), tower outputs when it trains (the step projects them
  for the policy and the reference, and runs no tower). They are handed over in memory: reading them from the cache's
  memory-mapped shards happens in the data loader, not timed.
- rrpo: phrase-level rewards and a token-wise KL (full logits of the answer positions for policy and reference).
Random weights and frames; the step time does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from bench_sft import PRESETS, build_ours
from timing import add_shape_arguments, round_robin

from videollm.data.feature_cache import cacheable_level, encode_videos
from videollm.data.sampling import SamplingSpec
from videollm.data.tokenizer import build_tiny_tokenizer
from videollm.data.video import FEATURE_KEYS, DecodedVideo
from videollm.model.builder import build_model_and_processor
from videollm.model.trainable import TrainablePolicy, apply_trainable_policy
from videollm.train.dpo import VideoDPOConfig, VideoDPOTrainer, build_preference_dataset
from videollm.train.hardware import Hardware


SFT, RRPO = "sft (2B sequences, 2B video encodings)", "rrpo, reference computed"
VARIANTS = (SFT, "dpo, reference computed", "dpo, reference cached", "dpo, features cached", RRPO)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, image_size=32, hidden=64)
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step (B)")
    parser.add_argument("--answer_words", type=int, default=12, help="words in each chosen / rejected answer")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up rounds)")
    parser.add_argument(
        "--preset", default=None, choices=sorted(PRESETS),
        help="bench_sft.py's model shapes instead of the size flags (--frames, --dtype and --pairs still apply)",
    )  # fmt: skip
    parser.add_argument(
        "--variants", nargs="+", default=None, choices=VARIANTS, metavar="NAME",
        help=f"steps to time (default: all): {' | '.join(VARIANTS)}",
    )  # fmt: skip
    args = parser.parse_args()
    args.variants = args.variants or list(VARIANTS)
    if SFT not in args.variants:
        args.variants.insert(0, SFT)  # every ratio is against it
    return args


def build_model(args: argparse.Namespace, workdir: Path):
    """A LoRA video LLM on saved random parts (LoRA needs a base it can be rebuilt from), or bench_sft.py's preset."""
    if args.preset:
        preset = {**PRESETS[args.preset], "frames": args.frames, "dtype": args.dtype}
        args.image_size = preset["vision"]["image"]
        args.attn = Hardware.detect(use_cpu=not args.device.startswith("cuda")).attention(None, packing=False)
        args.gradient_checkpointing = False
        args.mixed_precision = False  # every weight in --dtype, no autocast (build_ours reads both switches)
        return build_ours(preset, args)
    tokenizer = build_tiny_tokenizer()
    heads = max(args.llm_hidden // 64, 1) * 4 if args.llm_hidden >= 64 else 4
    vision = AutoConfig.for_model(
        "siglip_vision_model", hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers, num_attention_heads=4, image_size=args.image_size, patch_size=8,
    )  # fmt: skip
    text = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), hidden_size=args.llm_hidden, intermediate_size=4 * args.llm_hidden,
        num_hidden_layers=args.llm_layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=8192, tie_word_embeddings=False,
    )  # fmt: skip
    AutoModel.from_config(vision).save_pretrained(workdir / "vision")
    AutoModelForCausalLM.from_config(text).save_pretrained(workdir / "llm")
    tokenizer.save_pretrained(workdir / "llm")
    model, processor = build_model_and_processor(
        str(workdir / "vision"), str(workdir / "llm"), sampling=SamplingSpec(num_frames=args.frames)
    )
    model = apply_trainable_policy(model, TrainablePolicy(llm="lora", projector="frozen", lora_r=16, lora_dropout=0.0))
    return model.to(args.device, getattr(torch, args.dtype)), processor


def preference_rows(args: argparse.Namespace) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    words = ["left", "right", "red", "blue", "square", "circle", "moves", "then", "stops", "slowly", "fast", "the"]
    rows = []
    for i in range(args.pairs):
        frames = torch.randint(0, 256, (args.frames, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=generator)
        video = DecodedVideo(frames, list(range(args.frames)), [t / 8 for t in range(args.frames)], args.frames / 8, f"v{i}")
        answer = [words[int(j)] for j in torch.randint(len(words), (args.answer_words,), generator=generator)]
        rejected = answer[:-1] + ["left" if answer[-1] != "left" else "right"]
        rows.append({
            "id": str(i), "prompt": [{"role": "user", "content": "<video>\nWhat happens in the video?"}],
            "chosen": " ".join(answer), "rejected": " ".join(rejected), "videos": [video],
            "chosen_phrases": [answer[-1]], "rejected_phrases": [rejected[-1]],
        })  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        rows = preference_rows(args)
        trainers = {}
        for loss_type in ("sigmoid", "rrpo") if RRPO in args.variants else ("sigmoid",):
            torch.manual_seed(0)
            model, processor = build_model(args, Path(workdir) / loss_type)
            # a throwaway dataset: the trainer needs one; the timed batches are built directly from `rows`
            dataset = build_preference_dataset([{**r, "videos": []} for r in rows], processor, cache_dir=workdir)
            config = VideoDPOConfig(output_dir=workdir, use_cpu=args.device == "cpu", bf16=False, gradient_checkpointing=False,
                                    report_to="none", per_device_train_batch_size=args.pairs, loss_type=[loss_type])  # fmt: skip
            trainer = VideoDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor)
            trainer.model.train()
            optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-6)
            trainers[loss_type] = (trainer, optimizer)
        dpo, optimizer = trainers["sigmoid"]
        model = dpo.model

        def on_device(batch: dict) -> dict:
            return {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}

        dpo_batch = on_device(dpo.data_collator(rows))
        ref_chosen, ref_rejected = dpo.compute_ref_log_probs(model, dict(dpo_batch))
        cached_batch = {**dpo_batch, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
        frames, counts = dpo_batch["pixel_values_videos"], dpo_batch["video_num_frames"]
        level = cacheable_level(model)
        cached_features = torch.cat(encode_videos(model, frames, counts.tolist(), level))
        features_batch = {k: v for k, v in dpo_batch.items() if k != "pixel_values_videos"} | {FEATURE_KEYS[level]: cached_features}
        sft_batch = {
            "input_ids": dpo_batch["input_ids"],
            "attention_mask": dpo_batch["attention_mask"],
            "labels": dpo_batch["input_ids"].masked_fill(dpo_batch["completion_mask"] == 0, -100),
            "pixel_values_videos": torch.cat([frames, frames]),
            "video_num_frames": torch.cat([counts, counts]),
        }

        def update(loss: torch.Tensor, optimizer: torch.optim.Optimizer = optimizer) -> None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps = {
            SFT: lambda: update(model(**sft_batch).loss),
            "dpo, reference computed": lambda: update(dpo.compute_loss(model, dict(dpo_batch))),
            "dpo, reference cached": lambda: update(dpo.compute_loss(model, dict(cached_batch))),
            "dpo, features cached": lambda: update(dpo.compute_loss(model, dict(features_batch))),
        }
        if RRPO in args.variants:
            rrpo, rrpo_optimizer = trainers["rrpo"]
            rrpo_batch = on_device(rrpo.data_collator(rows))
            steps[RRPO] = lambda: update(rrpo.compute_loss(rrpo.model, dict(rrpo_batch)), rrpo_optimizer)
        variants = {name: steps[name] for name in args.variants}
        results = {name: statistics.median(t) * 1000 for name, t in round_robin(variants, args.device, args.steps).items()}

    tokens = int(dpo_batch["attention_mask"].sum())
    visual = int((dpo_batch["input_ids"] == dpo.processing_class.video_token_id).sum())
    shapes = (f"preset {args.preset}" if args.preset else
              f"LLM {args.llm_hidden}x{args.llm_layers}, vision {args.vision_hidden}x{args.vision_layers}")  # fmt: skip
    print(f"device {args.device}, dtype {args.dtype}; {args.pairs} pairs = {2 * args.pairs} sequences, {tokens} tokens "
          f"({visual} visual, {int(dpo_batch['completion_mask'].sum())} answer); {shapes}, {args.frames} frames; "
          f"features cached at the {level} level")  # fmt: skip
    sft = next(iter(results.values()))
    print(f"| {'step':<40} | {'ms / step':>10} | {'x sft':>6} |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 8}|")
    for name, ms in results.items():
        print(f"| {name:<40} | {ms:>10.1f} | {ms / sft:>6.2f} |")
    if args.json:
        rows = [{"step": name, "ms_per_step": ms, "x_sft": ms / sft} for name, ms in results.items()]
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "tokens": tokens, "visual_tokens": visual, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
