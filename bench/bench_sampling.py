"""k answers per prompt: shared vision encode + prefill (`generate_answers`) against naive per-sample `generate`.

    python bench/bench_sampling.py                                 # tiny-ish model on CPU
    python bench/bench_sampling.py --device cuda --llm_hidden 1024 --llm_layers 8 --prompts 16 --k 8

Three ways to get k answers for each of P prompts (videos already decoded; decoding is the same for all three):
- naive: one `model.generate` per answer, P x k calls, each encoding its video and prefilling its prompt;
- repeated batch: one `model.generate` over the P prompts each repeated k times (P x k encodes and prefills, batched);
- shared: `generate_answers` (P encodes, P prefills, the KV cache repeated k times, P x k rows decoded together).

Same outputs: greedy answers of all three are compared (they must be equal); sampled answers of shared and repeated
batch are compared under one seed (the same random draws in the same order). Naive per-sample sampling draws in
another order, so only its time is comparable. Random weights and frames. The variants take turns, one call each per
round after a warm-up round; a speed-up is the median over rounds of the two times of the same round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from videollm.data.sampling import SamplingSpec
from videollm.data.tokenizer import build_tiny_tokenizer
from videollm.data.video import DecodedVideo
from timing import add_shape_arguments

from videollm.infer.generate import GenerationSettings, generate_answers
from videollm.model.builder import build_model_and_processor


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, image_size=64, hidden=128)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch (P)")
    parser.add_argument("--k", type=int, default=8, help="answers per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (median), after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 steadies timings on a shared CPU)")
    return parser.parse_args()


def build(args: argparse.Namespace):
    tokenizer = build_tiny_tokenizer()
    heads = max(args.llm_hidden // 32, 4)
    vision = AutoConfig.for_model(
        "siglip_vision_model", hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
        num_hidden_layers=args.vision_layers, num_attention_heads=4, image_size=args.image_size, patch_size=8,
    )  # fmt: skip
    text = AutoConfig.for_model(
        "qwen2", vocab_size=len(tokenizer), hidden_size=args.llm_hidden, intermediate_size=4 * args.llm_hidden,
        num_hidden_layers=args.llm_layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=8192, tie_word_embeddings=False, initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    model, processor = build_model_and_processor(vision, text, tokenizer=tokenizer, sampling=SamplingSpec(num_frames=args.frames))
    return model.to(args.device, getattr(torch, args.dtype)).eval(), processor


def inputs(args: argparse.Namespace):
    generator = torch.Generator().manual_seed(0)
    questions = ["Which way does the shape move?", "What colour is it?", "Describe the video in one sentence.",
                 "Is the object moving left or right?", "What shape is shown?", "How fast does it move?"]  # fmt: skip
    conversations, videos = [], []
    for i in range(args.prompts):
        frames = torch.randint(0, 256, (args.frames, 3, args.image_size, args.image_size), dtype=torch.uint8, generator=generator)
        video = DecodedVideo(frames, list(range(args.frames)), [t / 8 for t in range(args.frames)], args.frames / 8, f"v{i}")
        conversations.append([{"role": "user", "content": f"<video>\n{questions[i % len(questions)]}"}])
        videos.append([video])
    return conversations, videos


@torch.no_grad()
def hf_generate(model, processor, conversations, videos, settings: GenerationSettings) -> list[str]:
    batch = {k: v.to(model.device) for k, v in processor(conversations, videos).items()}
    output = model.generate(**batch, **settings.generate_kwargs(processor))
    return [t.strip() for t in processor.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)]


def naive(model, processor, conversations, videos, settings: GenerationSettings) -> list[list[str]]:
    k = settings.num_return_sequences
    return [[hf_generate(model, processor, [c], [v], settings)[0] for _ in range(k)] for c, v in zip(conversations, videos)]


def repeated(model, processor, conversations, videos, settings: GenerationSettings) -> list[list[str]]:
    k = settings.num_return_sequences
    texts = hf_generate(model, processor, [c for c in conversations for _ in range(k)], [v for v in videos for _ in range(k)], settings)
    return [texts[i * k : (i + 1) * k] for i in range(len(conversations))]


def shared(model, processor, conversations, videos, settings: GenerationSettings) -> list[list[str]]:
    return generate_answers(model, processor, conversations, videos, settings)


VARIANTS = {"naive per-sample generate": naive, "repeated batch": repeated, "shared encode + prefill": shared}


def timed(variants: dict, runs: int, device: str, *fn_args) -> dict[str, list[float]]:
    """Seconds per call of each variant: one untimed warm-up round, then `runs` rounds in which the variants take turns
    (a change of load on a shared machine hits all of them alike), each call seeded with its round (CUDA synchronised)."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for run in range(runs + 1):
        for name, fn in variants.items():
            torch.manual_seed(run)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(*fn_args)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if run:
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = build(args)
    conversations, videos = inputs(args)
    greedy = GenerationSettings(max_new_tokens=args.max_new_tokens, num_return_sequences=args.k)
    sampled = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7, top_p=0.9,
                                 num_return_sequences=args.k)  # fmt: skip
    common = (model, processor, conversations, videos)

    greedy_answers = {name: fn(*common, greedy) for name, fn in VARIANTS.items()}
    greedy_equal = len({str(a) for a in greedy_answers.values()}) == 1
    seeded = {}
    for name in ("repeated batch", "shared encode + prefill"):
        torch.manual_seed(123)
        seeded[name] = VARIANTS[name](*common, sampled)
    sampled_equal = seeded["repeated batch"] == seeded["shared encode + prefill"]

    visual = processor.layout.count(args.frames)
    print(f"device {args.device}, {args.dtype}, {torch.get_num_threads()} threads; P={args.prompts} prompts x k={args.k} answers, {args.frames} frames "
          f"-> {visual} visual tokens a video; max_new_tokens={args.max_new_tokens}; LLM {args.llm_layers}x"
          f"{args.llm_hidden}, vision {args.vision_layers}x{args.vision_hidden}; median of {args.runs} runs")  # fmt: skip
    print(f"same greedy answers (all three): {greedy_equal}; same sampled answers, one seed (repeated vs shared): "
          f"{sampled_equal}")  # fmt: skip
    rows = []
    for settings_name, settings in (("greedy", greedy), ("sampled T=0.7 top-p 0.9", sampled)):
        times = timed(VARIANTS, args.runs, args.device, *common, settings)
        naive_times = times["naive per-sample generate"]
        for name, values in times.items():
            # speed-up: median over rounds of the naive call's time over this one's in the same round
            speedup = statistics.median(n / v for n, v in zip(naive_times, values, strict=True))
            rows.append((settings_name, name, statistics.median(values), speedup))
    print()
    print("| decoding | variant | seconds | answers/s | speed-up over naive |")
    print("|---|---|---|---|---|")
    for settings_name, name, seconds, speedup in rows:
        print(f"| {settings_name} | {name} | {seconds:.2f} | {args.prompts * args.k / seconds:.1f} | {speedup:.1f}x |")
    if args.json:
        cells = [{"decoding": d, "variant": n, "seconds": s, "answers_per_s": args.prompts * args.k / s, "x_naive": x}
                 for d, n, s, x in rows]  # fmt: skip
        result = {"args": vars(args), "same_greedy": greedy_equal, "same_sampled": sampled_equal, "rows": cells}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
