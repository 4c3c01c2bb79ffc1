"""Pre-flight validation of a JSONL data file: find every bad record before a run, not one per crash.

`validate_file` checks each record of a file the way training will read it:

1. schema and placeholders, with the loader of `videollm.data.formats` (the one every recipe uses);
2. every video decodes, at least one frame, within the time limit, through the same `FrameReader` (and, with a
   processor, the same sampling spec and backend) as training;
3. with a processor, the token budget: the record is encoded as training encodes it, so a sample that does not fit
   ``max_length`` (visual tokens are never cut) is reported.

Videos are checked in parallel (one decode process per thread) with a progress bar. The result, a
`ValidationReport`, lists each problem with ``file:line``, the record's id, the field at fault (None when the record
as a whole is) and the reason; `write_clean_file` copies the good lines, byte for byte, to a new file.
``data_tools/validate.py`` is the command line around it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from videollm.data.formats import (
    ConversationRecord,
    DataValidationError,
    LabelledRecord,
    PreferenceRecord,
    iter_jsonl,
    load_conversations,
    load_labelled,
    load_preferences,
)
from videollm.data.sampling import SamplingSpec
from videollm.data.video import DecodedVideo, FrameReader, VideoDecodeError

if TYPE_CHECKING:
    from videollm.data.processor import VideoLLMProcessor

RECORD_KINDS = ("conversations", "preferences", "labels")
_LOADERS: MappingProxyType[str, Callable[..., list[Any]]] = MappingProxyType(
    {"conversations": load_conversations, "preferences": load_preferences, "labels": load_labelled}
)
# A problem of `videollm.data.formats` reads "<location>: <field>: <message>" or "<location>: <message>"; fields are
# paths such as `id`, `video`, `videos[1]`, `conversations[2].value`.
_FIELD = re.compile(r"([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): (.*)", re.DOTALL)

Record = ConversationRecord | PreferenceRecord | LabelledRecord


@dataclass(frozen=True)
class RecordProblem:
    """One problem of one record.

    Attributes:
        location: ``file:line`` (or the file alone for a problem of the whole file).
        line: 1-based line number, None for the whole file.
        id: the record's id (its ``"id"``, else the loaders' ``{stem}:{line}``), None when the line is no record.
        field: the field at fault (``video``, ``conversations[1].value``, ...), None for the record as a whole.
        reason: what is wrong, in words.
    """

    location: str
    line: int | None
    id: str | None
    field: str | None
    reason: str


@dataclass
class ValidationReport:
    """Everything `validate_file` found: the good lines and each problem of the bad ones."""

    file: str
    kind: str
    records: int
    good_lines: list[int]
    problems: list[RecordProblem] = field(default_factory=list)

    @property
    def bad_lines(self) -> list[int]:
        """Line numbers of the records with at least one problem, in order."""
        return sorted({p.line for p in self.problems if p.line is not None})

    @property
    def ok(self) -> bool:
        """True when every record is good."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serialisable data (what `write` saves)."""
        return {
            "file": self.file,
            "kind": self.kind,
            "records": self.records,
            "good": len(self.good_lines),
            "bad": len(self.bad_lines),
            "bad_lines": self.bad_lines,
            "problems": [asdict(p) for p in self.problems],
        }

    def write(self, path: str | os.PathLike[str]) -> None:
        """Save the report as indented JSON."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def detect_kind(path: str | os.PathLike[str]) -> str:
    """The record kind of a JSONL file from its first object: preferences (``chosen``), labels, or conversations."""
    for _, raw in iter_jsonl(path):
        if isinstance(raw, dict):
            if "chosen" in raw or "rejected" in raw:
                return "preferences"
            if "question" in raw and "label" in raw and "conversations" not in raw and "messages" not in raw:
                return "labels"
            return "conversations"
    return "conversations"


def validate_file(
    path: str | os.PathLike[str],
    video_root: str | os.PathLike[str] | None = None,
    processor: VideoLLMProcessor | None = None,
    kind: str = "auto",
    num_workers: int = 4,
    decode_timeout: float | None = None,
    progress: bool = True,
) -> ValidationReport:
    """Check every record of a JSONL file (schema, placeholders, videos, token budget); see the module docstring.

    Args:
        path: the ``.jsonl`` file.
        video_root: where relative video paths start (as the recipes' ``video_root``).
        processor: the model's processor: its sampling spec, backend and time limit decode the videos, and it
            checks the token budget (its ``max_length``). Without one, videos are decoded with the default spec
            and the token budget is not checked.
        kind: ``conversations``, ``preferences``, ``labels``, or ``auto`` (`detect_kind`).
        num_workers: videos decoded in parallel.
        decode_timeout: seconds per video (default: the processor's, else 60).
        progress: show a progress bar.

    Raises:
        ValueError: the file is not ``.jsonl``, or `kind` or `num_workers` are invalid.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"{path}: only JSON Lines files (.jsonl) can be validated line by line")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind not in RECORD_KINDS:
        raise ValueError(f"kind must be 'auto' or one of {', '.join(RECORD_KINDS)}, got {kind!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")

    records, problems = _check_schema(path, kind, video_root)
    checker = _RecordChecker(kind, processor, decode_timeout)
    try:
        with ThreadPoolExecutor(max_workers=num_workers) as pool:
            futures = [pool.submit(checker.check, record) for record in records]
            bar = tqdm(as_completed(futures), total=len(futures), desc=f"validating {path.name}", disable=not progress)
            for future in bar:
                problems.extend(future.result())
    finally:
        checker.close()

    lines = [number for number, _ in iter_jsonl(path)]
    bad = {p.line for p in problems}
    problems.sort(key=lambda p: (p.line or 0, p.field or ""))
    return ValidationReport(
        file=str(path), kind=kind, records=len(lines), good_lines=[n for n in lines if n not in bad], problems=problems
    )


def write_clean_file(
    source: str | os.PathLike[str], good_lines: Iterable[int], output: str | os.PathLike[str]
) -> int:
    """Copy the lines numbered `good_lines` of `source` to `output`, byte for byte; return how many were written.

    The file is written next to `output` first and moved into place when complete.
    """
    keep = set(good_lines)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with tempfile.NamedTemporaryFile("wb", dir=output.parent, prefix=f".{output.name}.", delete=False) as out:
        with open(source, "rb") as lines:
            for number, line in enumerate(lines, start=1):
                if number in keep:
                    out.write(line)
                    written += 1
    os.replace(out.name, output)
    return written


# ---------------------------------------------------------------------------------------------------- schema


def _check_schema(
    path: Path, kind: str, video_root: str | os.PathLike[str] | None
) -> tuple[list[Record], list[RecordProblem]]:
    """Records that pass the loader's checks, and the problems of the others.

    The loader checks a whole file and raises on any problem, so the good records are read from a copy (same name,
    so that default ids stay the same) in which the bad lines are blanked; blank lines keep the line numbers.
    """
    load = _LOADERS[kind]
    lines = list(iter_jsonl(path))
    raw_ids = {number: raw.get("id") for number, raw in lines if isinstance(raw, dict)}
    problems: list[RecordProblem] = []
    blanked: set[int] = set()
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        # Two passes: one finds the problems, one reads the rest. A third only if a pass found nothing to blank.
        for _ in range(3):
            if blanked and blanked >= {number for number, _ in lines}:
                return [], problems  # every record is bad: loading the rest would report "no records found"
            _copy_blanking(path, copy, blanked)
            try:
                records = load(copy, video_root=video_root, check_videos=False)
            except DataValidationError as error:
                found = [_parse_problem(text, str(copy), path, raw_ids) for text in error.problems]
                problems.extend(found)
                new = {p.line for p in found if p.line is not None} - blanked
                if not new:  # a problem of the whole file (e.g. no records left): nothing is readable
                    return [], problems
                blanked |= new
                continue
            return [_relocated(record, str(copy), str(path)) for record in records], problems
    return [], problems


def _copy_blanking(source: Path, target: Path, blanked: set[int]) -> None:
    with open(source, "rb") as lines, open(target, "wb") as out:
        for number, line in enumerate(lines, start=1):
            out.write(b"\n" if number in blanked else line)


def _parse_problem(text: str, copy: str, original: Path, raw_ids: dict[int, Any]) -> RecordProblem:
    """A loader problem string about the copy -> a `RecordProblem` about the original file."""
    match = re.match(re.escape(copy) + r"(?::(\d+))?: (.*)", text, re.DOTALL)
    if match is None:
        return RecordProblem(str(original), None, None, None, text.replace(copy, str(original)))
    line = int(match.group(1)) if match.group(1) else None
    rest = match.group(2)
    field_match = _FIELD.fullmatch(rest)
    field_name, reason = (field_match.group(1), field_match.group(2)) if field_match else (None, rest)
    location = f"{original}:{line}" if line is not None else str(original)
    record_id = None
    if line is not None and line in raw_ids:
        value = raw_ids[line]
        record_id = str(value) if value is not None else f"{original.stem}:{line}"
    return RecordProblem(location, line, record_id, field_name, reason.replace(copy, str(original)))


def _relocated(record: Record, copy: str, original: str) -> Record:
    record.source = original + record.source.removeprefix(copy)
    return record


def _line_of(record: Record) -> int:
    return int(record.source.rsplit(":", 1)[1])


# ---------------------------------------------------------------------------------------------------- videos, tokens


@dataclass
class _VideoOutcome:
    error: str | None = None
    video: DecodedVideo | None = None


class _RecordChecker:
    """Checks the videos and the token budget of records from several threads, one decode process per thread.

    A video used by several records is decoded once; what is kept of it is its frame selection and the shape of
    its frames (enough to count its tokens), not the frames.
    """

    def __init__(self, kind: str, processor: VideoLLMProcessor | None, decode_timeout: float | None):
        self.kind = kind
        self.processor = processor
        self.spec = processor.spec if processor is not None else SamplingSpec()
        self.backend = processor.backend if processor is not None else "auto"
        timeout = decode_timeout if decode_timeout is not None else getattr(processor, "decode_timeout", None)
        self.timeout = timeout if timeout is not None else 60.0
        self._local = threading.local()
        self._readers: list[FrameReader] = []
        self._outcomes: dict[str, _VideoOutcome] = {}
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()  # the tokenizer is not safe to call from several threads at once

    def check(self, record: Record) -> list[RecordProblem]:
        line = _line_of(record)
        location = record.source
        problems = []
        videos = []
        for index, path in enumerate(record.videos):
            outcome = self._video(path)
            if outcome.error is not None:
                name = "video" if len(record.videos) == 1 else f"videos[{index}]"
                problems.append(RecordProblem(location, line, record.id, name, outcome.error))
            else:
                videos.append(outcome.video)
        if problems or self.processor is None or self.kind == "labels":
            return problems
        reason = self._token_problem(record, videos)
        if reason is not None:
            problems.append(RecordProblem(location, line, record.id, None, reason))
        return problems

    def close(self) -> None:
        """Stop the decode processes."""
        with self._lock:
            for reader in self._readers:
                reader.close()

    def _reader(self) -> FrameReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = FrameReader(self.spec, backend=self.backend, timeout=self.timeout)
            self._local.reader = reader
            with self._lock:
                self._readers.append(reader)
        return reader

    def _video(self, path: str) -> _VideoOutcome:
        with self._lock:
            known = self._outcomes.get(path)
        if known is not None:
            return known
        try:
            decoded = self._reader()(path)
            # Keep the selection and the frame shape, not the pixels: a zero-stride stand-in of the same shape.
            frames = torch.zeros((1, 1, 1, 1), dtype=torch.uint8).expand(decoded.frames.shape)
            video = DecodedVideo(frames, decoded.indices, decoded.timestamps, decoded.duration, path)
            outcome = _VideoOutcome(video=video)
        except VideoDecodeError as error:
            outcome = _VideoOutcome(error=str(error))
        with self._lock:
            self._outcomes[path] = outcome
        return outcome

    def _token_problem(self, record: Record, videos: Sequence[DecodedVideo]) -> str | None:
        """Why the record does not fit the processor's token budget, or None when it does."""
        if isinstance(record, PreferenceRecord):
            prompt = [{"role": m.role, "content": m.content} for m in record.prompt]
            answers = (record.chosen, record.rejected)
            conversations = [prompt + [{"role": "assistant", "content": answer}] for answer in answers]
        else:
            conversations = [[{"role": m.role, "content": m.content} for m in record.messages]]
        try:
            with self._encode_lock:
                for messages in conversations:
                    self.processor.encode(messages, videos, sample_id=record.id)
        except ValueError as error:  # SampleTooLongError, or placeholders the processor counts differently
            return str(error)
        return None

