"""Unreadable media during training: stop at once, or replace the sample, record it, and stop only past a limit.

A training set of thousands of downloaded videos always holds a few that cannot be decoded (empty, truncated, not
a video at all, a decoder that hangs). `bad_sample_policy` decides what happens when one is met:

* ``error``: stop at the first one, naming the sample and the file (`BadSampleError`).
* ``skip`` (default): the sample is replaced by another one of the same dataset, chosen deterministically from its
  id (the same replacement every epoch and in every process); it is logged, counted per rank, and written once to
  ``quarantine.jsonl`` in the output dir (one JSON line per bad sample: id, video, reason, rank, source, dataset).
  The run stops (`BadSampleLimitExceeded`) once too many samples are bad, see `exceeds_limit`.

Decoding happens in DataLoader worker processes, each sample within the processor's ``decode_timeout`` (a hung
decoder is killed with its process, see `videollm.data.video.FrameReader`). The counts and the set of known bad
samples are kept in shared memory, so that all the workers of a rank add up to one count, and a sample found bad
once is not decoded again (a hang costs its time limit once, not once per epoch).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from videollm.data.formats import DataValidationError
from videollm.data.video import DecodedVideo, VideoDecodeError

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from videollm.train.config import DataArguments

logger = logging.getLogger(__name__)

BAD_SAMPLE_ACTIONS = ("error", "skip")
QUARANTINE_FILE = "quarantine.jsonl"

# The columns that identify a preference row when two datasets share an id.
_ROW_CONTENT = ("prompt", "chosen", "rejected", "videos")

# How many replacement candidates a bad sample may go through before the run stops: only reached when most of the
# dataset is unreadable, which the fraction limit normally catches long before.
MAX_REPLACEMENT_TRIES = 16

T = TypeVar("T")


class BadSampleError(RuntimeError):
    """``bad_sample_policy: error`` met an unreadable sample; the message names the sample and the file."""


class BadSampleLimitExceeded(RuntimeError):
    """``bad_sample_policy: skip`` met more unreadable samples than ``max_bad_fraction`` allows."""


def failure_message(error: BadSampleError | BadSampleLimitExceeded) -> str:
    """The one-line message of a bad-sample failure, also when it was raised in a DataLoader worker.

    torch re-raises an exception from a worker process as the same type whose message is the worker's whole
    traceback; the original message is its last line, after the exception's qualified name.
    """
    text = str(error).strip()
    last = text.splitlines()[-1] if text else ""
    for prefix in (f"{type(error).__module__}.{type(error).__qualname__}: ", f"{type(error).__qualname__}: "):
        if last.startswith(prefix):
            return last[len(prefix) :]
    return last


def exceeds_limit(bad: int, seen: int, dataset_size: int, max_bad_fraction: float) -> bool:
    """Whether `bad` unreadable samples out of `seen` distinct samples seen (of `dataset_size`) must stop the run.

    The rule, per rank:

    * stop when ``bad > max_bad_fraction * dataset_size``: the data is certain to end over the limit, however short
      the run (a 200-sample set with 10 bad ones stops at the 3rd at 1 %);
    * otherwise judge the fraction ``bad / seen`` only once ``seen >= 1 / max_bad_fraction``, so that the first bad
      sample of a run never counts as 100 % (1 bad sample in 200 finishes at 1 %: 1/100 is not over the limit).

    ``max_bad_fraction = 0`` stops at the first bad sample; ``1`` never stops.
    """
    if bad <= 0:
        return False
    if max_bad_fraction <= 0:
        return True
    if bad > max_bad_fraction * dataset_size:
        return True
    return seen >= math.ceil(1 / max_bad_fraction) and bad > max_bad_fraction * seen


@dataclass(frozen=True)
class SampleInfo:
    """What a quarantine line and an error message say about a sample: its id, videos and where it was read from."""

    id: str
    videos: Sequence[str]
    source: str


@dataclass(frozen=True)
class BadSamplePolicy:
    """What to do with unreadable samples on one rank (see the module docstring).

    Attributes:
        action: ``"skip"`` or ``"error"``.
        max_bad_fraction: the limit of `exceeds_limit`.
        quarantine_file: where bad samples are listed (None: only logged).
        rank / world_size: this process's rank and the number of ranks; each rank counts its own samples, and sees
            about ``1 / world_size`` of each dataset.
    """

    action: str = "skip"
    max_bad_fraction: float = 0.01
    quarantine_file: str | None = None
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.action not in BAD_SAMPLE_ACTIONS:
            raise ValueError(f"bad_sample_policy: {self.action!r} is not one of {' | '.join(BAD_SAMPLE_ACTIONS)}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction: must be between 0 and 1, got {self.max_bad_fraction}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of {self.world_size}: not a valid rank")

    @classmethod
    def for_run(
        cls,
        action: str,
        max_bad_fraction: float,
        output_dir: str | os.PathLike[str],
        rank: int = 0,
        world_size: int = 1,
        resume: bool = False,
    ) -> BadSamplePolicy:
        """The policy of a training run writing to `output_dir`.

        Rank 0 starts a fresh ``quarantine.jsonl`` there (a resumed run keeps and appends to it), so that the file
        lists the bad samples of this run only. Call it on every rank before training starts.
        """
        quarantine = Path(output_dir) / QUARANTINE_FILE
        if rank == 0 and not resume:
            quarantine.unlink(missing_ok=True)
        return cls(action, max_bad_fraction, str(quarantine), rank, world_size)

    @classmethod
    def from_args(cls, data_args: DataArguments, training_args: TrainingArguments) -> BadSamplePolicy:
        """`for_run` from a recipe's data keys (policy, limit) and trainer config (output dir, rank, resume)."""
        return cls.for_run(
            data_args.bad_sample_policy,
            data_args.max_bad_fraction,
            training_args.output_dir,
            rank=training_args.process_index,
            world_size=training_args.world_size,
            resume=bool(training_args.resume_from_checkpoint),
        )

    def guard(self, dataset_size: int, name: str = "train") -> BadSampleGuard:
        """A `BadSampleGuard` for one dataset of `dataset_size` samples, called `name` in messages."""
        return BadSampleGuard(self, dataset_size, name)


class BadSampleGuard:
    """Applies a `BadSamplePolicy` to the samples of one dataset: `load` fetches a sample or its replacement.

    The state (which samples were seen, which are bad, how many of each) lives in shared memory created here, in the
    process that builds the dataset, and is inherited by its DataLoader workers, so the counts are per rank and not
    per worker. Create the guard before the DataLoader starts its workers.
    """

    def __init__(self, policy: BadSamplePolicy, dataset_size: int, name: str = "train"):
        if dataset_size < 1:
            raise ValueError(f"BadSampleGuard: the {name} dataset is empty")
        self.policy = policy
        self.dataset_size = dataset_size
        self.name = name
        # spawn-context primitives also pass to DataLoader workers started with spawn or forkserver (a fork-context
        # lock cannot), and work as well in forked ones.
        context = multiprocessing.get_context("spawn")
        self._lock = context.Lock()
        self._seen = context.RawArray(ctypes.c_bool, dataset_size)
        self._bad = context.RawArray(ctypes.c_bool, dataset_size)
        self._counts = context.RawArray(ctypes.c_int64, 2)  # [distinct seen, distinct bad]

    @property
    def rank_size(self) -> int:
        """About how many samples of the dataset this rank sees in one epoch."""
        return math.ceil(self.dataset_size / self.policy.world_size)

    @property
    def seen(self) -> int:
        """Distinct samples of this dataset fetched on this rank so far."""
        return int(self._counts[0])

    @property
    def bad(self) -> int:
        """Distinct unreadable samples of this dataset found on this rank so far."""
        return int(self._counts[1])

    def load(self, index: int, fetch: Callable[[int], T], describe: Callable[[int], SampleInfo]) -> T:
        """`fetch(index)`, or under ``skip`` the first readable replacement when it raises `VideoDecodeError`.

        Args:
            index: the sample asked for.
            fetch: decodes and encodes one sample by index.
            describe: the id, videos and source of a sample by index (for replacement, messages and quarantine).

        Raises:
            BadSampleError: ``error`` policy, the sample is unreadable.
            BadSampleLimitExceeded: ``skip`` policy, too many samples are unreadable (`exceeds_limit`), or no
                readable replacement was found in `MAX_REPLACEMENT_TRIES` candidates.
        """
        for candidate in self._candidates(index, describe):
            if self._bad[candidate]:
                continue
            self._mark_seen(candidate)
            try:
                return fetch(candidate)
            except VideoDecodeError as error:
                info = describe(candidate)
                if self.policy.action == "error":
                    raise BadSampleError(
                        f"sample {info.id!r} ({info.source}) of the {self.name} set: {error}; "
                        "set bad_sample_policy: skip to replace unreadable samples instead"
                    ) from error
                self._quarantine(candidate, info, error)
        raise BadSampleLimitExceeded(
            f"no readable replacement for sample {describe(index).id!r} of the {self.name} set in "
            f"{MAX_REPLACEMENT_TRIES} tries ({self.bad} unreadable samples found); see {self.policy.quarantine_file}"
        )

    def summary(self) -> str | None:
        """One line on the bad samples this rank replaced in this dataset, or None when there were none."""
        if not self.bad:
            return None
        where = f"; listed in {self.policy.quarantine_file}" if self.policy.quarantine_file else ""
        return (
            f"rank {self.policy.rank}: {self.bad} of {self.seen} samples seen in the {self.name} set were unreadable "
            f"({self.bad / max(self.seen, 1):.1%}) and replaced{where}"
        )

    def _candidates(self, index: int, describe: Callable[[int], SampleInfo]) -> Iterator[int]:
        """`index`, then its replacement candidates: a hash of its id and the attempt number, modulo the size.

        Deterministic, so a bad sample gets the same replacement in every epoch and every worker (which keeps
        precomputed per-sample values, such as DPO reference log-probs, consistent with what is trained on).
        """
        yield index
        if self.policy.action == "error":
            return
        sample_id = describe(index).id
        for attempt in range(MAX_REPLACEMENT_TRIES):
            digest = hashlib.sha256(f"{sample_id}\0{attempt}".encode()).digest()
            candidate = int.from_bytes(digest[:8], "big") % self.dataset_size
            if candidate != index:
                yield candidate

    def _mark_seen(self, index: int) -> None:
        with self._lock:
            if not self._seen[index]:
                self._seen[index] = True
                self._counts[0] += 1

    def _quarantine(self, index: int, info: SampleInfo, error: VideoDecodeError) -> None:
        """Count a newly found bad sample, log it, list it in the quarantine file, and stop past the limit."""
        with self._lock:
            if self._bad[index]:
                return
            self._bad[index] = True
            self._counts[1] += 1
            bad, seen = self.bad, self.seen
        policy = self.policy
        logger.warning(
            "rank %d: unreadable sample %r (%s) of the %s set replaced: %s [%d bad of %d seen]",
            policy.rank, info.id, info.source, self.name, error, bad, seen,
        )  # fmt: skip
        if policy.quarantine_file is not None:
            line = {
                "id": info.id,
                "video": error.path,
                "reason": error.reason,
                "rank": policy.rank,
                "source": info.source,
                "dataset": self.name,
            }
            _append_once(policy.quarantine_file, line, key=("id", "dataset"))
        if exceeds_limit(bad, seen, self.rank_size, policy.max_bad_fraction):
            where = f"; they are listed in {policy.quarantine_file}" if policy.quarantine_file else ""
            raise BadSampleLimitExceeded(
                f"{bad} unreadable samples of {seen} seen on rank {policy.rank} ({bad / max(seen, 1):.1%}) in the "
                f"{self.name} set of {self.dataset_size}, over max_bad_fraction={policy.max_bad_fraction:g}; "
                f"stopped{where}. Fix or drop them (data_tools/validate.py finds them all before training) "
                "or raise max_bad_fraction"
            )


def bad_sample_summaries(guards: Iterable[BadSampleGuard | None]) -> list[str]:
    """The `BadSampleGuard.summary` lines of the guards that replaced samples (for a recipe's final report)."""
    return [line for guard in guards if guard is not None and (line := guard.summary()) is not None]


def _append_once(path: str, entry: dict, key: Sequence[str]) -> None:
    """Append `entry` as one JSON line unless a line with the same `key` fields is there already (a resumed run meets
    again the bad samples found after its last checkpoint), under an exclusive lock: DataLoader workers and ranks share
    the quarantine file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    wanted = tuple(entry.get(k) for k in key)
    with open(path, "a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0)
            for existing in handle:
                try:
                    known = json.loads(existing)
                except json.JSONDecodeError:
                    continue
                if tuple(known.get(k) for k in key) == wanted:
                    return
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_for_policy(
    load: Callable[..., list[T]],
    source: str | os.PathLike[str],
    video_root: str | os.PathLike[str] | None,
    policy: BadSamplePolicy,
) -> list[T]:
    """Read training records with a `videollm.data.formats` loader, checking what the policy makes fatal up front.

    A schema problem always stops the run before training, with every problem listed (missing videos included).
    A video file that does not exist is fatal up front under ``error``; under ``skip`` it is one more unreadable
    sample, replaced and quarantined like a corrupt one.

    Raises:
        DataValidationError: from the loader.
    """
    if policy.action == "error":
        return load(source, video_root=video_root)
    try:
        return load(source, video_root=video_root, check_videos=False)
    except DataValidationError as schema_error:
        # Report the missing videos too, so that one run shows every problem of the file.
        load(source, video_root=video_root)
        raise schema_error


class BadSampleCollator:
    """Decodes the videos of each row under a `BadSampleGuard` before an inner collator sees the rows.

    For trainers whose collator decodes (the DPO trainer, which keeps its datasets as `datasets.Dataset` rows of
    video paths): a row whose videos cannot be decoded is replaced by another row of the dataset it came from, found
    by its ``id`` (and, should two datasets share an id, by its content). The rows handed on hold `DecodedVideo`s
    in ``videos``; columns of the original row that the replacement lacks (e.g. precomputed reference log-probs,
    which were computed on the same deterministic replacement) are kept.

    Args:
        collator: the collator that encodes rows whose ``videos`` are `DecodedVideo`s.
        load_video: decodes one video path (e.g. ``processor.load_video``).
        datasets: the datasets whose rows reach this collator, by name (e.g. ``{"train": ..., "eval": ...}``).
        policy: the bad-sample policy.
    """

    def __init__(
        self,
        collator: Callable[[Sequence[dict[str, Any]]], Any],
        load_video: Callable[[str], DecodedVideo],
        datasets: Mapping[str, Sequence[Mapping[str, Any]]],
        policy: BadSamplePolicy,
    ):
        self.collator = collator
        self.load_video = load_video
        self.datasets = {name: rows for name, rows in datasets.items() if rows is not None}
        self.guards = {name: policy.guard(len(rows), name) for name, rows in self.datasets.items()}
        self._ids: dict[str, dict[str, int]] = {}

    def __call__(self, examples: Sequence[dict[str, Any]]) -> Any:
        """The inner collator's batch of `examples`, each with its videos decoded or replaced by a readable row."""
        return self.collator([self._decoded(dict(example)) for example in examples])

    def _decoded(self, example: dict[str, Any]) -> dict[str, Any]:
        located = self._locate(example)
        if located is None:
            return {**example, "videos": [self._video(v) for v in example["videos"]]}
        name, index = located
        rows = self.datasets[name]

        def fetch(i: int) -> dict[str, Any]:
            row = example if i == index else {**example, **rows[i]}
            return {**row, "videos": [self._video(v) for v in row["videos"]]}

        def describe(i: int) -> SampleInfo:
            row = rows[i]
            return SampleInfo(id=str(row.get("id", i)), videos=list(row["videos"]), source=f"{name}[{i}]")

        return self.guards[name].load(index, fetch, describe)

    def _video(self, video: str | DecodedVideo) -> DecodedVideo:
        return video if isinstance(video, DecodedVideo) else self.load_video(video)

    def _locate(self, example: dict[str, Any]) -> tuple[str, int] | None:
        """(dataset name, row index) of an example, by id and then content; None when it is in none of them."""
        for name, rows in self.datasets.items():
            if name not in self._ids:
                ids = rows["id"] if hasattr(rows, "column_names") else [row.get("id") for row in rows]
                self._ids[name] = {str(value): i for i, value in enumerate(ids)}
            index = self._ids[name].get(str(example.get("id")))
            if index is not None and all(rows[index].get(k) == example.get(k) for k in _ROW_CONTENT):
                return name, index
        return None
