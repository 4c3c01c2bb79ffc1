"""Precompute the frozen vision features of every video of a training run (see `videollm.data.feature_cache`).

    python data_tools/cache_features.py --config recipes/configs/my_sft.yaml --feature_cache_dir cache/my_sft
    accelerate launch recipes/sft.py --config recipes/configs/my_sft.yaml --feature_cache_dir cache/my_sft

    python data_tools/cache_features.py --recipe dpo --config recipes/configs/my_dpo.yaml --feature_cache_dir cache/dpo
    accelerate launch recipes/dpo.py --config recipes/configs/my_dpo.yaml --feature_cache_dir cache/dpo

Takes the training config itself (model, data and recipe keys of `--recipe`: sft, dpo, star or self_preference; the
trainer keys give the device, dtype handling and `dataloader_num_workers` for decoding), builds or loads the model
exactly as the recipe does, decodes every video the run will see (`train_file`, `eval_file`, and `round_train_files`
for dpo; the labelled records after `types` and the limits for the self-training recipes) with the processor's
sampling spec, and stores the tower outputs (frozen tower, trained projector) or the projector outputs (both
frozen). Runs again resume: videos already cached are skipped. A video that cannot be decoded is recorded as
unreadable, and training applies its `bad_sample_policy` to it; a rerun tries it again.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from videollm.data.feature_cache import (
    LEVELS,
    FeatureCacheError,
    FeatureCacheWriter,
    cache_identity,
    cacheable_level,
    encode_videos,
)
from videollm.data.formats import DataValidationError, load_conversations, load_preferences
from videollm.data.processor import VideoLLMProcessor
from videollm.data.video import VideoDecodeError
from videollm.selftrain.runs import load_records
from videollm.selftrain.self_preference import SelfPreferenceArguments
from videollm.selftrain.star import StarArguments
from videollm.train.config import DataArguments, ModelArguments, parse_config
from videollm.train.dpo import VideoDPOConfig
from videollm.train.setup import load_or_build
from videollm.train.sft import VideoSFTConfig


@dataclass
class CacheArguments:
    """How the cache is written (the model and data keys are the training run's)."""

    recipe: str = field(
        default="sft", metadata={"help": "the recipe whose config this is: sft | dpo | star | self_preference"}
    )
    cache_level: str = field(
        default="auto", metadata={"help": "auto (projector when it is frozen, else tower) | tower | projector"}
    )
    cache_batch_videos: int = field(default=8, metadata={"help": "videos per vision-tower forward"})
    cache_dtype: str | None = field(
        default=None, metadata={"help": "store features in this dtype (e.g. bfloat16 halves fp32 caches); default: as computed"}
    )
    cache_shard_mb: int = field(default=1024, metadata={"help": "approximate size of one safetensors shard"})


class _Videos(Dataset):
    """Decodes one video per item (in DataLoader workers); a decode failure is returned, not raised."""

    def __init__(self, paths: Sequence[str], processor: VideoLLMProcessor):
        self.paths = list(paths)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            video = self.processor.load_video(path)
        except VideoDecodeError as error:
            return path, None, None, error.reason
        return path, video, self.processor.pixel_values(video), None


def _files(loader, *file_keys: str):
    """Records of a recipe that reads record files: `loader` over the data keys' files and the trainer keys' lists."""

    def read(data_args: DataArguments, config: Any) -> list:
        sources = [data_args.train_file, data_args.eval_file]
        sources += [path for key in file_keys for path in getattr(config, key) or []]
        return [
            record
            for source in dict.fromkeys(sources)
            if source
            for record in loader(source, video_root=data_args.video_root, check_videos=False)
        ]

    return read


def _labelled(data_args: DataArguments, config: Any) -> list:
    """The labelled records a self-training run answers and evaluates on (after its `types` and limits)."""
    train, evaluation = load_records(data_args, config)
    return train + evaluation


# Each recipe's own config dataclasses (the trainer's last) and how it reads the records whose videos it sees.
RECIPES: dict[str, tuple[list[type], Callable[[DataArguments, Any], list]]] = {
    "sft": ([VideoSFTConfig], _files(load_conversations)),
    "dpo": ([VideoDPOConfig], _files(load_preferences, "round_train_files")),
    "star": ([StarArguments, VideoSFTConfig], _labelled),
    "self_preference": ([SelfPreferenceArguments, VideoDPOConfig], _labelled),
}


def _recipe(argv: Sequence[str]) -> str:
    """`--recipe`, read before the config is parsed: it decides which trainer keys the config may hold."""
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", default="sft")
    return recipe.parse_known_args(argv)[0].recipe


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the training config, encode every uncached video, and print what was written."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    recipe = _recipe(argv)
    if recipe not in RECIPES:
        sys.exit(f"error: recipe: {recipe!r} is not one of {' | '.join(RECIPES)}")
    configs, read_records = RECIPES[recipe]
    model_args, data_args, cache_args, *recipe_args = parse_config([ModelArguments, DataArguments, CacheArguments, *configs], argv)
    training_args = recipe_args[-1]
    if not data_args.feature_cache_dir:
        sys.exit("error: feature_cache_dir is required (where to write the cache)")
    if cache_args.cache_level not in ("auto", *LEVELS):
        sys.exit(f"error: cache_level: {cache_args.cache_level!r} is not one of auto | {' | '.join(LEVELS)}")
    dtype = getattr(torch, cache_args.cache_dtype, None) if cache_args.cache_dtype else None
    if cache_args.cache_dtype and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        problem = "is not a floating-point torch dtype (bfloat16, float16, float32)"
        sys.exit(f"error: cache_dtype: {cache_args.cache_dtype!r} {problem}")
    if cache_args.cache_batch_videos < 1 or cache_args.cache_shard_mb < 1:
        sys.exit("error: cache_batch_videos and cache_shard_mb must be >= 1")
    try:
        records = read_records(data_args, recipe_args[0])
    except (DataValidationError, ValueError) as error:
        sys.exit(f"error: invalid data:\n{error}")
    if not records:
        sys.exit("error: no records: give train_file (and eval_file, or round_train_files for dpo)")

    model, processor = load_or_build(model_args, data_args, seed=training_args.seed, training_args=training_args)
    try:
        level = cacheable_level(model) if cache_args.cache_level == "auto" else cache_args.cache_level
        if level == "projector" and cacheable_level(model) != "projector":
            raise FeatureCacheError("cache_level: projector needs tune_projector: frozen (the projector would train)")
    except FeatureCacheError as error:
        sys.exit(f"error: {error}")
    model = model.to(training_args.device).eval()
    identity = cache_identity(model, processor, level)
    writer = FeatureCacheWriter(
        data_args.feature_cache_dir,
        identity,
        video_root=data_args.video_root,
        shard_bytes=cache_args.cache_shard_mb << 20,
        dtype=dtype,
    )
    paths = list(dict.fromkeys(path for record in records for path in record.videos))
    todo = [path for path in paths if path not in writer]
    print(f"{len(paths)} videos, {len(paths) - len(todo)} already cached; writing {level}-level features to {writer.folder}")

    loader = DataLoader(
        _Videos(todo, processor),
        batch_size=cache_args.cache_batch_videos,
        num_workers=training_args.dataloader_num_workers,
        collate_fn=list,
    )
    start, done, unreadable, stored_bytes = time.perf_counter(), 0, 0, 0
    for batch in loader:
        readable = [(path, video, pixels) for path, video, pixels, _ in batch if video is not None]
        for path, _, _, reason in batch:
            if reason is not None:
                writer.add_unreadable(path, reason)
                unreadable += 1
                print(f"unreadable: {path}: {reason}", file=sys.stderr)
        if readable:
            pixels = torch.cat([p for _, _, p in readable]).to(training_args.device)
            features = encode_videos(model, pixels, [len(v.indices) for _, v, _ in readable], level)
            for (path, video, _), tensor in zip(readable, features, strict=True):
                writer.add(path, tensor, video)
                stored_bytes += tensor.numel() * (torch.finfo(writer.dtype).bits // 8 if writer.dtype else tensor.element_size())
        done += len(batch)
        print(f"{done}/{len(todo)} videos, {time.perf_counter() - start:.0f} s", flush=True)
    writer.close()
    print(
        f"cached {done - unreadable} videos ({stored_bytes / 2**20:.1f} MiB), {unreadable} unreadable, in "
        f"{time.perf_counter() - start:.1f} s: {writer.folder}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
