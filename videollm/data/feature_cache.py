"""Vision-feature cache: frozen vision-tower (or frozen tower + projector) outputs of every video, computed once.

With the tower frozen, every epoch decodes the same frames and runs the same tower on them; the cache stores the
result in safetensors shards so that training reads features instead (`CachedFeatureDataset`), skipping the decode
and the tower forward.

Two levels:
- `tower`: `encode_frames` output, `(frames, patches, vision_hidden)` per video; the projector still runs (and may
  train) on it. Needs a frozen tower.
- `projector`: projector output, `(visual tokens, llm_hidden)` per video; the model skips both. Needs a frozen tower
  and projector.

A cache lives in `cache_dir/<level>-<identity>/`: the identity is a hash of the model fingerprint (the state dict and
config of the tower, and of the projector for the `projector` level), the sampling spec and the pixel normalisation.
A cache built for other weights, another config or another spec is therefore never found, and opening it fails with
what differs; a video whose file changed (size or modification time) since it was cached fails too. Nothing is ever
read stale. Inside, `index.json` maps each video (its path relative to `video_root`) to its shard and frame metadata.

Build one with `data_tools/cache_features.py` (`--recipe` names the config's recipe); every recipe reads it through
the `feature_cache_dir` data key. `FeatureCache.get` returns a `CachedVideo`, which the processor turns into model
inputs in place of frames, so SFT (`CachedFeatureDataset`), DPO (the preference collator) and generation all read
the cache the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISDIR
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from videollm.data.dataset import SAMPLE_ID, ConversationDataset, record_messages
from videollm.data.formats import ConversationRecord
from videollm.data.processor import VideoLLMProcessor
from videollm.data.robust import BadSamplePolicy
from videollm.data.video import IMAGE_EXTENSIONS, CachedVideo, DecodedVideo, VideoDecodeError
from videollm.model.trainable import unwrap

CACHE_FORMAT = 1
LEVELS = ("tower", "projector")
MANIFEST = "manifest.json"
INDEX = "index.json"
# Config entries that say where a part came from or how it is run, not what it computes.
_CONFIG_NOISE = ("transformers_version", "architectures", "dtype", "torch_dtype")
REBUILD_HINT = "build it with: python data_tools/cache_features.py --config <the training config> (same model and data keys)"


class FeatureCacheError(RuntimeError):
    """The cache does not hold what training asks for: another model, another spec, a changed or missing video."""


@dataclass(frozen=True)
class CacheIdentity:
    """Everything the cached features depend on. Two caches hold interchangeable features iff identities are equal."""

    level: str
    model_fingerprint: str
    sampling: dict[str, Any]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """The identity as JSON data (what `manifest.json` holds), with the cache format version."""
        return {
            "format": CACHE_FORMAT,
            "level": self.level,
            "model_fingerprint": self.model_fingerprint,
            "sampling": self.sampling,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    @property
    def folder(self) -> str:
        """The cache's folder name: the level and a hash of `to_dict`."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()
        return f"{self.level}-{digest[:16]}"


def model_fingerprint(model: nn.Module, level: str) -> str:
    """sha256 over the vision tower's config, feature layer and weights (and the projector's, for `projector`).

    Weights are hashed byte for byte, with their names, shapes and dtypes: a fine-tuned or re-cast tower is a
    different tower. SigLIP-so400m (0.8 GB in bf16) takes a few seconds.
    """
    if level not in LEVELS:
        raise ValueError(f"level: {level!r} is not one of {' | '.join(LEVELS)}")
    base = unwrap(model)
    config = base.config
    digest = hashlib.sha256()
    described = {
        "vision_config": _config_dict(config.vision_config),
        "vision_feature_layer": config.vision_feature_layer,
        "drops_cls_token": config.vision_has_cls_token,
    }
    parts = [base.model.vision_tower]
    if level == "projector":
        described["projector"] = {
            key: getattr(config, key)
            for key in ("projector_type", "pool_output_size", "num_query_tokens", "frame_embeddings", "max_frames")
        }
        described["qformer_config"] = _config_dict(config.qformer_config) if config.qformer_config is not None else None
        described["llm_hidden_size"] = config.text_config.hidden_size
        parts.append(base.model.projector)
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for part in parts:
        for name, tensor in sorted(part.state_dict().items()):
            tensor = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _config_dict(config) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _CONFIG_NOISE}


def cache_identity(model: nn.Module, processor: VideoLLMProcessor, level: str) -> CacheIdentity:
    """The identity of the features `model` would compute for videos sampled and normalised by `processor`."""
    return CacheIdentity(
        level=level,
        model_fingerprint=model_fingerprint(model, level),
        sampling=processor.spec.to_dict(),
        image_mean=tuple(float(v) for v in processor.image_mean),
        image_std=tuple(float(v) for v in processor.image_std),
    )


def frozen_parts(model: nn.Module) -> tuple[bool, bool]:
    """(vision tower frozen, projector frozen) of a model, wrapped in PEFT or not."""
    base = unwrap(model).model
    return (
        not any(p.requires_grad for p in base.vision_tower.parameters()),
        not any(p.requires_grad for p in base.projector.parameters()),
    )


def cacheable_level(model: nn.Module) -> str:
    """The deepest level whose output does not change in training: `projector`, `tower`, or an error."""
    tower_frozen, projector_frozen = frozen_parts(model)
    if not tower_frozen:
        raise FeatureCacheError(
            "feature_cache_dir: the vision tower trains (tune_vision: full), so its outputs change every step and cannot "
            "be cached; set tune_vision: frozen or drop feature_cache_dir"
        )
    return "projector" if projector_frozen else "tower"


@torch.no_grad()
def encode_videos(model: nn.Module, pixel_values: torch.Tensor, num_frames: Sequence[int], level: str) -> list[torch.Tensor]:
    """What the cache stores for each video of one batch: tower features `(frames, patches, D)` or visual tokens."""
    base = unwrap(model)
    features = base.encode_frames(pixel_values)
    if level == "tower":
        return list(features.split(list(num_frames)))
    return base.get_video_features(None, list(num_frames), frame_features=features)


def video_key(path: str | os.PathLike[str], video_root: str | os.PathLike[str] | None) -> str:
    """A video's name in the cache: its path relative to `video_root` when inside it (the data can move), else absolute."""
    absolute = os.path.abspath(os.fspath(path))
    if video_root is not None:
        relative = os.path.relpath(absolute, os.path.abspath(os.fspath(video_root)))
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return Path(relative).as_posix()
    return Path(absolute).as_posix()


def _file_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Size and modification time of a video; None when it does not exist.

    A frame folder also gets a digest of the name, size and modification time of each of its images: overwriting a
    frame in place (re-extracting frames under the same names) leaves the folder's own size and mtime unchanged.
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    state: dict[str, Any] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if S_ISDIR(stat.st_mode):
        frames = []
        with os.scandir(path) as entries:
            for entry in entries:
                if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
                    frame = entry.stat()
                    frames.append((entry.name, frame.st_size, frame.st_mtime_ns))
        state["frames"] = hashlib.sha256(json.dumps(sorted(frames)).encode()).hexdigest()
    return state


def _tensor_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _write_json(path: Path, value: Any) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, sort_keys=True))
    os.replace(temporary, path)


class FeatureCacheWriter:
    """Adds videos to the cache folder of one identity, in shards of about `shard_bytes`; resumes a partial cache.

    Not safe for several writers on one folder at once. Shards and the index are replaced atomically, so an
    interrupted run leaves a valid cache of everything flushed before it.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        identity: CacheIdentity,
        video_root: str | os.PathLike[str] | None = None,
        shard_bytes: int = 1 << 30,
        dtype: torch.dtype | None = None,
    ):
        self.folder = Path(cache_dir) / identity.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()) != identity.to_dict():
            raise FeatureCacheError(f"{manifest} does not describe this model and spec (a hash collision or a hand edit)")
        _write_json(manifest, identity.to_dict())
        self.identity = identity
        self.video_root = video_root
        self.shard_bytes = shard_bytes
        self.dtype = dtype
        index_path = self.folder / INDEX
        self.index: dict[str, dict[str, Any]] = json.loads(index_path.read_text()) if index_path.is_file() else {}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_entries: dict[str, dict[str, Any]] = {}
        self._pending_bytes = 0
        self._next_shard = len(list(self.folder.glob("shard-*.safetensors")))

    def __contains__(self, path: str | os.PathLike[str]) -> bool:
        """Whether the video's features are stored and its file is unchanged. A video recorded as unreadable is not:
        a rerun tries it again, since a failure may have been passing (a decode timeout on a busy machine)."""
        key = video_key(path, self.video_root)
        entry = self._pending_entries.get(key) or self.index.get(key)
        return entry is not None and "tensor" in entry and entry["file"] == _file_state(path)

    def add(self, path: str | os.PathLike[str], features: torch.Tensor, video: DecodedVideo) -> None:
        """Queue one video's features (flushed to a shard when the queue reaches `shard_bytes`)."""
        key = video_key(path, self.video_root)
        tensor = features.detach().to("cpu", self.dtype or features.dtype).contiguous()
        self._pending[_tensor_name(key)] = tensor
        self._pending_entries[key] = {
            "tensor": _tensor_name(key),
            "file": _file_state(path),
            "indices": [int(i) for i in video.indices],
            "timestamps": [float(t) for t in video.timestamps],
            "duration": float(video.duration),
        }
        self._pending_bytes += tensor.numel() * tensor.element_size()
        if self._pending_bytes >= self.shard_bytes:
            self.flush()

    def add_unreadable(self, path: str | os.PathLike[str], reason: str) -> None:
        """Record a video that could not be decoded: training treats it as its `bad_sample_policy` says, as it would
        when decoding it itself."""
        self._pending_entries[video_key(path, self.video_root)] = {"file": _file_state(path), "unreadable": reason}

    def flush(self) -> None:
        """Write the queued videos as one shard and record them in the index."""
        if not self._pending_entries:
            return
        if self._pending:
            name = f"shard-{self._next_shard:05d}.safetensors"
            temporary = self.folder / f"{name}.tmp"
            metadata = {"identity": json.dumps(self.identity.to_dict(), sort_keys=True)}
            save_file(self._pending, str(temporary), metadata=metadata)
            os.replace(temporary, self.folder / name)
            self._next_shard += 1
            for entry in self._pending_entries.values():
                if "tensor" in entry:
                    entry["shard"] = name
        self.index.update(self._pending_entries)
        _write_json(self.folder / INDEX, self.index)
        self._pending, self._pending_entries, self._pending_bytes = {}, {}, 0

    def close(self) -> None:
        """Flush what is queued; the cache is complete once this returns."""
        self.flush()


class FeatureCache:
    """Read side of one cache folder: features and frame metadata by video path, shards opened lazily (memory-mapped).

    Use `FeatureCache.open` (from a model) rather than the constructor: it checks that the cache matches.
    """

    def __init__(self, folder: str | os.PathLike[str], video_root: str | os.PathLike[str] | None = None):
        self.folder = Path(folder)
        manifest = json.loads((self.folder / MANIFEST).read_text())
        self.level = manifest["level"]
        self.identity = manifest
        self.index: dict[str, dict[str, Any]] = json.loads((self.folder / INDEX).read_text())
        self.video_root = video_root
        self._shards: dict[str, Any] = {}

    @classmethod
    def open(
        cls,
        cache_dir: str | os.PathLike[str],
        model: nn.Module,
        processor: VideoLLMProcessor,
        video_root: str | os.PathLike[str] | None = None,
        level: str | None = None,
    ) -> FeatureCache:
        """The cache in `cache_dir` that matches this model (weights, configs, frozen parts) and the processor's spec.

        `level` defaults to the deepest one the model allows (see `cacheable_level`) that is present, preferring
        `projector`. Raises `FeatureCacheError` saying what differs when nothing matches.
        """
        allowed = cacheable_level(model)
        if level is not None and level not in LEVELS:
            raise ValueError(f"level: {level!r} is not one of {' | '.join(LEVELS)}")
        if level == "projector" and allowed == "tower":
            raise FeatureCacheError("a projector-level cache needs a frozen projector, but the projector trains")
        candidates = [level] if level else (["projector", "tower"] if allowed == "projector" else ["tower"])
        wanted = []
        for candidate in candidates:
            identity = cache_identity(model, processor, candidate)
            if (Path(cache_dir) / identity.folder / INDEX).is_file():
                return cls(Path(cache_dir) / identity.folder, video_root)
            wanted.append(identity)
        raise FeatureCacheError(_mismatch_message(Path(cache_dir), wanted))

    def _entry(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        key = video_key(path, self.video_root)
        entry = self.index.get(key)
        if entry is None:
            raise FeatureCacheError(f"{path}: not in the feature cache {self.folder}; {REBUILD_HINT}")
        return entry

    def check(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Fail before training if any video is missing from the cache or changed on disk since it was cached."""
        missing, changed = [], []
        for path in dict.fromkeys(os.fspath(p) for p in paths):
            entry = self.index.get(video_key(path, self.video_root))
            if entry is None:
                missing.append(path)
            elif entry["file"] != _file_state(path):
                changed.append(path)
        problems = []
        if missing:
            problems.append(f"{len(missing)} videos are not cached (first: {missing[0]})")
        if changed:
            problems.append(f"{len(changed)} videos changed on disk since they were cached (first: {changed[0]})")
        if problems:
            raise FeatureCacheError(f"feature cache {self.folder}: {'; '.join(problems)}; {REBUILD_HINT}")

    def get(self, path: str | os.PathLike[str]) -> CachedVideo:
        """The cached features and frame metadata of one video.

        Raises:
            VideoDecodeError: the cache builder could not decode this video (the bad-sample policy applies).
            FeatureCacheError: the video is not in the cache.
        """
        entry = self._entry(path)
        if "unreadable" in entry:
            raise VideoDecodeError(os.fspath(path), f"{entry['unreadable']} (when the feature cache was built)")
        shard = self._shards.get(entry["shard"])
        if shard is None:
            shard = self._shards[entry["shard"]] = safe_open(str(self.folder / entry["shard"]), framework="pt")
        return CachedVideo(
            frames=torch.empty((0, 3, 0, 0), dtype=torch.uint8),
            indices=list(entry["indices"]),
            timestamps=list(entry["timestamps"]),
            duration=entry["duration"],
            path=os.fspath(path),
            features=shard.get_tensor(entry["tensor"]),
            level=self.level,
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_shards"] = {}  # file handles stay in their process; each DataLoader worker opens its own
        return state


def _mismatch_message(cache_dir: Path, wanted: list[CacheIdentity]) -> str:
    """Why no cache folder matches: name the folders there and what differs in each."""
    found = []
    for manifest_path in sorted(cache_dir.glob(f"*/{MANIFEST}")):
        manifest = json.loads(manifest_path.read_text())
        target = next((w for w in wanted if w.level == manifest.get("level")), None)
        if target is None:
            found.append(f"{manifest_path.parent.name} (level {manifest.get('level')}, not usable with this model)")
            continue
        target_dict = target.to_dict()
        reasons = []
        if manifest.get("model_fingerprint") != target_dict["model_fingerprint"]:
            parts = "vision tower" + (" or projector" if target.level == "projector" else "")
            reasons.append(f"another {parts} (weights, dtype or config)")
        if manifest.get("sampling") != target_dict["sampling"]:
            reasons.append(f"sampling spec {manifest.get('sampling')} instead of {target_dict['sampling']}")
        if (manifest.get("image_mean"), manifest.get("image_std")) != (target_dict["image_mean"], target_dict["image_std"]):
            reasons.append("another pixel normalisation")
        found.append(f"{manifest_path.parent.name} ({', '.join(reasons) or 'another cache format'})")
    levels = " or ".join(w.level for w in wanted)
    where = "; ".join(found) if found else "nothing"
    return (
        f"feature_cache_dir {cache_dir}: no {levels}-level cache for this model and sampling spec "
        f"(expected folder {' or '.join(w.folder for w in wanted)}); found: {where}. Stale features are never used: "
        f"{REBUILD_HINT}"
    )


class CachedFeatureDataset(ConversationDataset):
    """`ConversationDataset` with cached features in place of decoded frames.

    Each item has the processor's `input_ids` / `labels` (the visual-token count and timestamps come from the cached
    frame metadata, so they equal what decoding gives) and the videos' cached features under `video_frame_features`
    (tower level) or `video_embeds` (projector level), with `video_num_frames`. Every video is checked up front; one
    the cache builder could not decode goes to the bad-sample policy, as a decode failure would.
    """

    def __init__(
        self,
        records: Sequence[ConversationRecord],
        processor: VideoLLMProcessor,
        cache: FeatureCache,
        bad_samples: BadSamplePolicy | None = None,
        name: str = "train",
    ):
        super().__init__(records, processor, bad_samples, name=name)
        self.cache = cache
        cache.check(path for record in self.records for path in record.videos)

    def _encode(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        videos = [self.cache.get(path) for path in record.videos]
        features = self.processor.encode(record_messages(record), videos, sample_id=record.id).as_features()
        features[SAMPLE_ID] = record.id
        return features
