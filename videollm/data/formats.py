"""Dataset records: read, normalise and validate conversation, preference and label data.

Every training and evaluation entry point reads its data through this module, so that the rest of
``videollm`` sees one normalised form whatever the data was written as, and so that a bad data file
fails once, up front, with a list of *every* problem rather than one crash per fix-and-rerun cycle.

Accepted record forms
---------------------
Conversations (SFT, evaluation), read by :func:`load_conversations`:

* LLaVA style: ``{"id", "video": "a.mp4" | ["a.mp4", ...], "conversations": [{"from": "human",
  "value": "<video>\\nWhat ...?"}, {"from": "gpt", "value": "..."}], "system"?}``. Roles
  ``human``/``user`` become ``user``, ``gpt``/``assistant`` become ``assistant``, ``system`` stays.
* Messages style: ``{"id"?, "messages": [{"role": "user", "content": ...}, ...], "videos": [...]}``
  where ``content`` is a string or a list of content parts ``{"type": "text", "text": ...}`` /
  ``{"type": "video", "video": "path"}``. A video part becomes a placeholder at its position (parts
  are joined with ``"\\n"``); its path, if it has one, takes that position in the record's videos.
  A video part without a path takes the next entry of ``"videos"``, as a text placeholder does.

Preferences (DPO), read by :func:`load_preferences`: ``{"id"?, "video"?, "prompt", "chosen",
"rejected"}`` where ``prompt`` is a string (one user turn) or a list of messages ending with a user
turn, and ``chosen``/``rejected`` are strings or exactly one assistant message (a dict or a
one-element list). ``chosen_phrases``/``rejected_phrases`` are kept as-is in ``meta``.

Labels (self-training), read by :func:`load_labelled`: ``{"id"?, "video"?, "question", "label",
"label_type"?}``. The question is kept verbatim: no placeholder is counted or inserted.

Either ``"video"`` or ``"videos"`` (not both) may give a record's top-level videos in every form;
a record without videos is text-only. Fields that are absent and fields that are ``null`` are
treated alike, because Parquet files and ``datasets`` fill missing keys with nulls. Fields a form
does not use go to ``meta`` (null values dropped), e.g. LLaVA's ``"type"``.

Placeholders
------------
The number of placeholders (``"<video>"`` by default) in the user turns must equal the number of
videos. One exception: a record that has videos but no placeholder at all gets one
``"<video>\\n"`` per video prepended to its first user turn, because LLaVA-style data often omits
the placeholder. A placeholder in an assistant or system turn is an error (it would put video
tokens into the training targets or the system prompt).

Locations
---------
Problems and ``record.source`` name the record as ``file:line`` (1-based line) for JSONL and as
``file[index]`` (0-based record index, as in ``records[index]``) for JSON arrays, Parquet files and
``datasets`` objects. A record without an ``"id"`` gets ``"{file stem}:{line or index}"``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import datasets

__all__ = [
    "PLACEHOLDER",
    "ConversationRecord",
    "DataValidationError",
    "LabelledRecord",
    "Message",
    "PreferenceRecord",
    "iter_jsonl",
    "load_conversations",
    "load_labelled",
    "load_preferences",
    "write_jsonl",
]

PLACEHOLDER = "<video>"
"""Default marker for where a video goes in the text of a user turn."""

_ROLES: Mapping[str, str] = MappingProxyType(
    {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
)
_ROLE_NAMES = ", ".join(repr(name) for name in _ROLES)
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Message:
    """One turn of a conversation; ``content`` is text with placeholders where videos go."""

    role: str
    content: str


@dataclass
class ConversationRecord:
    """A conversation for SFT or evaluation; ``videos`` are resolved paths, in placeholder order."""

    id: str
    messages: list[Message]
    videos: list[str]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreferenceRecord:
    """A DPO pair: a prompt (ending with a user turn) and the chosen and rejected answers."""

    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    videos: list[str]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class LabelledRecord:
    """A question with a reference label, for self-training and scoring."""

    id: str
    question: str
    label: Any
    label_type: str | None
    videos: list[str]
    source: str
    meta: dict[str, Any] = field(default_factory=dict)


class DataValidationError(ValueError):
    """Raised once per load with every problem found; ``str()`` gives one problem per line.

    Each problem reads ``"<location>: <field>: <message>"`` (or ``"<location>: <message>"`` when no
    single field is at fault), e.g. ``"train.jsonl:7: conversations[1].value: must be a non-empty
    string"``.
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[type[DataValidationError], tuple[list[str]]]:
        return (type(self), (self.problems,))


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[int, dict[str, Any] | ValueError]]:
    """Yield ``(line number, record)`` for each non-blank line of a JSONL file (lines count from 1).

    A line that is not valid JSON, or is JSON but not an object, yields a ``ValueError`` in place of
    the record instead of raising, so that callers can report every bad line at once.
    """
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if number == 1:
                line = line.removeprefix(b"\xef\xbb\xbf")
            line = line.strip()
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, ValueError(f"invalid JSON: {error.msg} (column {error.colno})")
                continue
            except ValueError as error:
                yield number, ValueError(f"unreadable line: {error}")
                continue
            if isinstance(value, dict):
                yield number, value
            else:
                yield number, ValueError(f"record must be a JSON object, got {_json_type(value)}")


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Write records as JSONL (UTF-8, one object per line), atomically.

    The lines go to a temporary file next to ``path`` that replaces ``path`` only once complete, so
    a crash or a non-serialisable record never leaves a truncated file for a reader to pick up.
    Parent directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            for record in records:
                if not isinstance(record, Mapping):
                    raise TypeError(f"write_jsonl writes mappings, got {type(record).__name__}")
                out.write(json.dumps(dict(record), ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def relative_video_path(path: str, video_root: str | None) -> str:
    """`path` as a written record names it: relative to `video_root` when it lies under it (the loaders, given the same
    root, read it back, and the data can move with its videos), else as it is."""
    if video_root is None:
        return path
    relative = os.path.relpath(path, video_root)
    return path if relative.startswith("..") else relative


def load_conversations(
    source: str | os.PathLike[str] | datasets.Dataset | datasets.IterableDataset,
    video_root: str | os.PathLike[str] | None = None,
    check_videos: bool = True,
    placeholder: str = PLACEHOLDER,
) -> list[ConversationRecord]:
    """Read LLaVA- or messages-style conversations into :class:`ConversationRecord` objects.

    ``source`` is a ``.jsonl``/``.json``/``.parquet`` path or a ``datasets.Dataset``. Relative video
    paths are joined to ``video_root`` (used as given, i.e. relative to the working directory, when
    it is None); absolute paths are kept. With ``check_videos`` every video must exist on disk.
    Raises :class:`DataValidationError` listing every problem in the source.
    """
    reader = _RecordReader(video_root, check_videos, placeholder)
    return reader.load(source, reader.conversation)


def load_preferences(
    source: str | os.PathLike[str] | datasets.Dataset | datasets.IterableDataset,
    video_root: str | os.PathLike[str] | None = None,
    check_videos: bool = True,
    placeholder: str = PLACEHOLDER,
) -> list[PreferenceRecord]:
    """Read DPO preference pairs into :class:`PreferenceRecord` objects.

    Sources, video paths and errors are handled as in :func:`load_conversations`. Besides the
    structural checks, a pair whose chosen and rejected answers are identical is rejected, since it
    carries no preference signal.
    """
    reader = _RecordReader(video_root, check_videos, placeholder)
    return reader.load(source, reader.preference)


def load_labelled(
    source: str | os.PathLike[str] | datasets.Dataset | datasets.IterableDataset,
    video_root: str | os.PathLike[str] | None = None,
    check_videos: bool = True,
) -> list[LabelledRecord]:
    """Read question/label records for self-training into :class:`LabelledRecord` objects.

    Sources, video paths and errors are handled as in :func:`load_conversations`; the question is
    kept verbatim (no placeholder handling), and ``label`` may be any non-null JSON value.
    """
    reader = _RecordReader(video_root, check_videos, PLACEHOLDER)
    return reader.load(source, reader.labelled)


@dataclass(frozen=True)
class _Location:
    """Where a record came from: a JSONL line (1-based) or a record index (0-based)."""

    name: str
    stem: str
    number: int
    is_line: bool

    def __str__(self) -> str:
        return f"{self.name}:{self.number}" if self.is_line else f"{self.name}[{self.number}]"

    def default_id(self) -> str:
        return f"{self.stem}:{self.number}"


@dataclass(frozen=True)
class _VideoRef:
    """A video path as written in the record, with the field it came from (for messages)."""

    path: str
    field: str


@dataclass
class _Turn:
    """A parsed turn; ``role``/``text`` are None when invalid (the problem is already reported)."""

    role: str | None
    text: str | None
    role_field: str
    text_field: str
    slots: list[_VideoRef | None]


_Record = TypeVar("_Record")


def _iter_source(
    source: str | os.PathLike[str] | datasets.Dataset | datasets.IterableDataset,
) -> Iterator[tuple[_Location, dict[str, Any] | ValueError]]:
    """Yield every record of a source with its location; the one reading path for all formats.

    Record-level problems (a bad JSONL line, a non-object) are yielded as ``ValueError``; problems
    that make the whole source unreadable raise :class:`DataValidationError` (or ``TypeError`` for a
    source of the wrong kind, ``FileNotFoundError`` for a missing file).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name, stem, suffix = os.fspath(source), path.stem, path.suffix.lower()
        if suffix not in _FILE_SUFFIXES:
            problem = f"unsupported file extension {path.suffix!r}; expected {', '.join(_FILE_SUFFIXES)}"
            raise DataValidationError([f"{name}: {problem}"])
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {name}")
        if suffix == ".jsonl":
            for line, record in iter_jsonl(path):
                yield _Location(name, stem, line, is_line=True), record
            return
        rows = _read_json_array(path, name) if suffix == ".json" else _read_parquet(path, name)
    else:
        name = stem = _dataset_name(source)
        rows = iter(source)
    for index, row in enumerate(rows):
        location = _Location(name, stem, index, is_line=False)
        if isinstance(row, dict):
            yield location, row
        else:
            yield location, ValueError(f"record must be a JSON object, got {_json_type(row)}")


def _read_json_array(path: Path, name: str) -> list[Any]:
    """Parse a ``.json`` file holding a list of records."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            value = json.load(handle)
    except json.JSONDecodeError as error:
        hint = "; if this is JSON Lines, name the file .jsonl" if error.msg == "Extra data" else ""
        raise DataValidationError(
            [f"{name}:{error.lineno}: invalid JSON: {error.msg} (column {error.colno}){hint}"]
        ) from error
    except UnicodeDecodeError as error:
        raise DataValidationError([f"{name}: not UTF-8 text: {error}"]) from error
    if not isinstance(value, list):
        problem = f"a .json file must hold a list of records, got {_json_type(value)}"
        raise DataValidationError([f"{name}: {problem}"])
    return value


def _read_parquet(path: Path, name: str) -> Iterator[dict[str, Any]]:
    """Stream the rows of a Parquet file as dicts, one record batch at a time."""
    import pyarrow
    import pyarrow.parquet

    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except pyarrow.ArrowException as error:
        raise DataValidationError([f"{name}: cannot read Parquet file: {error}"]) from error
    for batch in parquet.iter_batches():
        yield from batch.to_pylist()


def _dataset_name(source: object) -> str:
    """Name a ``datasets`` object for locations and default ids, or reject a non-dataset source."""
    import datasets

    if isinstance(source, datasets.DatasetDict | datasets.IterableDatasetDict):
        splits = ", ".join(repr(split) for split in source)
        raise TypeError(f"pass one split of the DatasetDict (one of {splits}), e.g. dataset['train']")
    if not isinstance(source, datasets.Dataset | datasets.IterableDataset):
        raise TypeError(
            f"source must be a .jsonl/.json/.parquet path or a datasets.Dataset, got {type(source).__name__}"
        )
    return source.info.dataset_name or "dataset"


class _RecordReader:
    """One load: settings, the problems found so far, and one normaliser per record kind."""

    def __init__(
        self, video_root: str | os.PathLike[str] | None, check_videos: bool, placeholder: str
    ) -> None:
        if not isinstance(placeholder, str) or not placeholder:
            raise ValueError("placeholder must be a non-empty string")
        self.video_root = None if video_root is None else os.fspath(video_root)
        self.check_videos = check_videos
        self.placeholder = placeholder
        self.problems: list[str] = []
        self._exists: dict[str, bool] = {}

    def load(
        self,
        source: str | os.PathLike[str] | datasets.Dataset | datasets.IterableDataset,
        normalise: Callable[[dict[str, Any], _Location, str], _Record | None],
    ) -> list[_Record]:
        """Normalise every record of ``source``, then raise if any problem was found."""
        records: list[_Record] = []
        first_seen: dict[str, _Location] = {}
        count = 0
        for location, raw in _iter_source(source):
            count += 1
            if isinstance(raw, ValueError):
                self.report(location, None, str(raw))
                continue
            record_id = self.record_id(raw, location)
            if record_id is not None:
                if record_id in first_seen:
                    problem = f"duplicate id {record_id!r} (first at {first_seen[record_id]})"
                    self.report(location, "id", problem)
                else:
                    first_seen[record_id] = location
            record = normalise(raw, location, record_id or "")
            if record is not None:
                records.append(record)
        if count == 0:
            name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else _dataset_name(source)
            self.problems.append(f"{name}: no records found")
        if self.problems:
            raise DataValidationError(self.problems)
        return records

    def report(self, location: _Location, field_name: str | None, message: str) -> None:
        """Record one problem against a record and (optionally) one of its fields."""
        prefix = f"{location}: {field_name}" if field_name else f"{location}"
        self.problems.append(f"{prefix}: {message}")

    def conversation(
        self, raw: dict[str, Any], location: _Location, record_id: str
    ) -> ConversationRecord | None:
        """Normalise a LLaVA- or messages-style conversation (see the module docstring)."""
        start = len(self.problems)
        if raw.get("conversations") is not None and raw.get("messages") is not None:
            self.report(location, None, "record has both 'conversations' and 'messages'; give one")
            return None
        if raw.get("conversations") is not None:
            turns_field, role_key, content_key = "conversations", "from", "value"
        elif raw.get("messages") is not None:
            turns_field, role_key, content_key = "messages", "role", "content"
        else:
            hint = _kind_hint(raw)
            self.report(location, None, f"missing 'conversations' (LLaVA style) or 'messages'{hint}")
            return None
        top = self.top_level_videos(raw, location)
        system = self.system_turn(raw, location)
        parsed = self.turns(raw[turns_field], location, turns_field, role_key, content_key)
        if parsed is None:
            return None
        turns = system + parsed
        self.check_order(turns, location, turns_field, last_role="assistant")
        videos = self.videos(turns, top, location, turns_field)
        if len(self.problems) > start:
            return None
        return ConversationRecord(
            id=record_id,
            messages=[Message(turn.role, turn.text) for turn in turns],
            videos=videos,
            source=str(location),
            meta=_meta(raw, {"id", "video", "videos", "system", turns_field}),
        )

    def preference(
        self, raw: dict[str, Any], location: _Location, record_id: str
    ) -> PreferenceRecord | None:
        """Normalise a preference pair (see the module docstring)."""
        start = len(self.problems)
        if not {"prompt", "chosen", "rejected"} & raw.keys() and (hint := _kind_hint(raw)):
            self.report(location, None, f"missing 'prompt', 'chosen' and 'rejected'{hint}")
            return None
        top = self.top_level_videos(raw, location)
        system = self.system_turn(raw, location)
        prompt = raw.get("prompt")
        if isinstance(prompt, list):
            prompt_turns = self.turns(prompt, location, "prompt", "role", "content")
        else:
            prompt_turns = [self.turn("user", prompt, location, "prompt", "prompt")]
        turns, videos = [], []
        if prompt_turns is not None:
            turns = system + prompt_turns
            self.check_order(turns, location, "prompt", last_role="user")
            videos = self.videos(turns, top, location, "prompt")
        chosen = self.completion(raw.get("chosen"), location, "chosen")
        rejected = self.completion(raw.get("rejected"), location, "rejected")
        if chosen is not None and chosen == rejected:
            self.report(location, "rejected", "identical to 'chosen'")
        for key in ("chosen_phrases", "rejected_phrases"):
            if raw.get(key) is not None and not isinstance(raw[key], list):
                self.report(location, key, f"must be a list, got {_json_type(raw[key])}")
        if len(self.problems) > start:
            return None
        return PreferenceRecord(
            id=record_id,
            prompt=[Message(turn.role, turn.text) for turn in turns],
            chosen=chosen,
            rejected=rejected,
            videos=videos,
            source=str(location),
            meta=_meta(raw, {"id", "video", "videos", "system", "prompt", "chosen", "rejected"}),
        )

    def labelled(self, raw: dict[str, Any], location: _Location, record_id: str) -> LabelledRecord | None:
        """Normalise a question/label record (see the module docstring)."""
        start = len(self.problems)
        if "question" not in raw and (hint := _kind_hint(raw)):
            self.report(location, "question", f"missing{hint}")
            return None
        top = self.top_level_videos(raw, location)
        question = raw.get("question")
        if not isinstance(question, str) or not question.strip():
            self.report(location, "question", _text_problem(question))
        label = raw.get("label")
        if label is None:
            self.report(location, "label", "missing; must be a non-null value")
        elif isinstance(label, str) and not label.strip():
            self.report(location, "label", "must not be empty")
        label_type = raw.get("label_type")
        if label_type is not None and (not isinstance(label_type, str) or not label_type.strip()):
            self.report(location, "label_type", f"must be a non-empty string, got {_json_type(label_type)}")
        videos = self.resolve(top, location)
        if len(self.problems) > start:
            return None
        return LabelledRecord(
            id=record_id,
            question=question,
            label=label,
            label_type=label_type,
            videos=videos,
            source=str(location),
            meta=_meta(raw, {"id", "video", "videos", "question", "label", "label_type"}),
        )

    def record_id(self, raw: dict[str, Any], location: _Location) -> str | None:
        """The record's id as a string, the location-based default, or None if it is invalid."""
        value = raw.get("id")
        if value is None:
            return location.default_id()
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.report(location, "id", f"must be a string or an integer, got {_json_type(value)}")
            return None
        if isinstance(value, str) and not value.strip():
            self.report(location, "id", "must not be empty")
            return None
        return str(value)

    def top_level_videos(self, raw: dict[str, Any], location: _Location) -> list[_VideoRef]:
        """The paths given by the record's ``"video"`` or ``"videos"`` field, in order."""
        keys = [key for key in ("video", "videos") if raw.get(key) is not None]
        if len(keys) == 2:
            self.report(location, "videos", "give either 'video' or 'videos', not both")
            return []
        if not keys:
            return []
        key, value = keys[0], raw[keys[0]]
        if isinstance(value, str):
            entries = [(value, key)]
        elif isinstance(value, list):
            entries = [(item, f"{key}[{index}]") for index, item in enumerate(value)]
        else:
            self.report(location, key, f"must be a path or a list of paths, got {_json_type(value)}")
            return []
        refs = []
        for path, field_name in entries:
            if isinstance(path, str) and path.strip():
                refs.append(_VideoRef(path, field_name))
            else:
                self.report(location, field_name, f"must be a non-empty path string, got {_describe(path)}")
        return refs

    def system_turn(self, raw: dict[str, Any], location: _Location) -> list[_Turn]:
        """The optional top-level ``"system"`` field as a leading system turn."""
        if raw.get("system") is None:
            return []
        return [self.turn("system", raw["system"], location, "system", "system")]

    def turns(
        self, value: Any, location: _Location, turns_field: str, role_key: str, content_key: str
    ) -> list[_Turn] | None:
        """Parse a list of turns such as ``conversations`` or ``messages``; None if it is no list."""
        if not isinstance(value, list) or not value:
            self.report(location, turns_field, f"must be a non-empty list of turns, got {_describe(value)}")
            return None
        turns = []
        for index, item in enumerate(value):
            item_field = f"{turns_field}[{index}]"
            role_field, text_field = f"{item_field}.{role_key}", f"{item_field}.{content_key}"
            if not isinstance(item, dict):
                expected = f"an object with '{role_key}' and '{content_key}'"
                self.report(location, item_field, f"must be {expected}, got {_json_type(item)}")
                turns.append(_Turn(None, None, role_field, text_field, []))
                continue
            role = self.role(item.get(role_key), location, role_field)
            turns.append(self.turn(role, item.get(content_key), location, role_field, text_field))
        return turns

    def role(self, value: Any, location: _Location, field_name: str) -> str | None:
        """Map a role name to ``user``/``assistant``/``system`` (case-insensitively)."""
        role = _ROLES.get(value.lower()) if isinstance(value, str) else None
        if role is None:
            got = "missing" if value is None else f"unknown role {value!r}"
            self.report(location, field_name, f"{got}; expected one of {_ROLE_NAMES}")
        return role

    def turn(
        self, role: str | None, content: Any, location: _Location, role_field: str, text_field: str
    ) -> _Turn:
        """Parse one turn's content; placeholders are only allowed in user turns."""
        text, slots = self.content(content, location, text_field)
        if role in ("assistant", "system") and slots:
            self.report(location, text_field, f"{self.placeholder!r} may only appear in user turns")
        return _Turn(role, text, role_field, text_field, slots)

    def content(
        self, value: Any, location: _Location, field_name: str
    ) -> tuple[str | None, list[_VideoRef | None]]:
        """Turn a string or a list of content parts into text and its video slots.

        Each slot is a video referenced at that position: a ``_VideoRef`` for a video part that
        names its path, None for a text placeholder or a path-less video part (filled later from
        the record's top-level videos).
        """
        if isinstance(value, str):
            if not value.strip():
                self.report(location, field_name, _text_problem(value))
                return None, []
            return value, [None] * value.count(self.placeholder)
        if not isinstance(value, list) or not value:
            self.report(location, field_name, _text_problem(value, parts=True))
            return None, []
        pieces: list[str] = []
        slots: list[_VideoRef | None] = []
        ok = True
        for index, part in enumerate(value):
            part_field = f"{field_name}[{index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if isinstance(text, str) and text.strip():
                    pieces.append(text)
                    slots.extend([None] * text.count(self.placeholder))
                else:
                    self.report(location, f"{part_field}.text", _text_problem(text))
                    ok = False
            elif kind == "video":
                path = part.get("video") if part.get("video") is not None else part.get("path")
                if path is None:
                    slots.append(None)
                elif isinstance(path, str) and path.strip():
                    slots.append(_VideoRef(path, f"{part_field}.video"))
                else:
                    problem = f"must be a non-empty path string, got {_describe(path)}"
                    self.report(location, f"{part_field}.video", problem)
                    ok = False
                pieces.append(self.placeholder)
            elif isinstance(part, dict):
                self.report(location, f"{part_field}.type", f"unknown part type {kind!r}; expected 'text' or 'video'")
                ok = False
            else:
                self.report(location, part_field, f"must be a content part object, got {_json_type(part)}")
                ok = False
        return ("\n".join(pieces), slots) if ok else (None, slots)

    def completion(self, value: Any, location: _Location, key: str) -> str | None:
        """Parse ``chosen``/``rejected``: a string or exactly one assistant message."""
        field_name = key
        if isinstance(value, list):
            if len(value) != 1:
                expected = "a string or exactly one assistant message"
                self.report(location, key, f"must be {expected}, got {len(value)} messages")
                return None
            value, field_name = value[0], f"{key}[0]"
        if isinstance(value, dict):
            role = self.role(value.get("role"), location, f"{field_name}.role")
            if role not in (None, "assistant"):
                self.report(location, f"{field_name}.role", f"must be 'assistant', got {role!r}")
            value, field_name = value.get("content"), f"{field_name}.content"
        return self.turn("assistant", value, location, field_name, field_name).text

    def check_order(self, turns: list[_Turn], location: _Location, turns_field: str, last_role: str) -> None:
        """Check: system turn only first, then user and assistant alternate, starting with user."""
        if not turns or any(turn.role is None for turn in turns):
            return
        expected = "user"
        for index, turn in enumerate(turns):
            if turn.role == "system":
                if index != 0:
                    self.report(location, turn.role_field, "a system turn may only come first, once")
                    return
                continue
            if turn.role != expected:
                problem = f"expected role {expected!r} here, got {turn.role!r}"
                self.report(location, turn.role_field, problem)
                return
            expected = "assistant" if expected == "user" else "user"
        if all(turn.role == "system" for turn in turns):
            self.report(location, turns_field, "must contain at least one user turn")
        elif turns[-1].role != last_role:
            self.report(location, turns_field, f"must end with a turn of role {last_role!r}, got {turns[-1].role!r}")

    def videos(
        self, turns: list[_Turn], top: list[_VideoRef], location: _Location, turns_field: str
    ) -> list[str]:
        """Match placeholders to videos (applying the missing-placeholder rule) and resolve paths."""
        slots = [slot for turn in turns if turn.role == "user" for slot in turn.slots]
        if not slots and top:
            first_user = next((turn for turn in turns if turn.role == "user" and turn.text is not None), None)
            if first_user is not None:
                first_user.text = f"{self.placeholder}\n" * len(top) + first_user.text
            return self.resolve(top, location)
        free = slots.count(None)
        if free != len(top):
            self.report(
                location,
                turns_field,
                f"{free} {self.placeholder!r} placeholder(s) without a path in the text"
                f" but {len(top)} video(s) in 'video'/'videos'",
            )
            return []
        remaining = iter(top)
        return self.resolve([slot if slot is not None else next(remaining) for slot in slots], location)

    def resolve(self, refs: list[_VideoRef], location: _Location) -> list[str]:
        """Join relative paths to ``video_root`` and, if asked, check that each exists."""
        paths = []
        for ref in refs:
            path = ref.path
            if self.video_root is not None and not os.path.isabs(path):
                path = os.path.join(self.video_root, path)
            if self.check_videos:
                if path not in self._exists:
                    self._exists[path] = os.path.exists(path)
                if not self._exists[path]:
                    self.report(location, ref.field, f"video not found: {path}")
            paths.append(path)
        return paths


def _meta(raw: dict[str, Any], consumed: set[str]) -> dict[str, Any]:
    """The fields a form does not use, minus nulls (which Parquet/datasets add for absent keys)."""
    return {key: value for key, value in raw.items() if key not in consumed and value is not None}


def _kind_hint(raw: dict[str, Any]) -> str:
    """` (this looks like a ... record: ...)` for a record of another kind than the loader's, else ''."""
    if raw.get("conversations") is not None or raw.get("messages") is not None:
        return " (this looks like a conversation record: SFT data, for recipes/sft.py and videollm.eval)"
    if "chosen" in raw:
        return " (this looks like a preference record: DPO data, for recipes/dpo.py; use load_preferences)"
    if "label" in raw and "question" in raw:
        return " (this looks like a labelled record: question + label, for recipes/star.py and recipes/self_preference.py)"
    return ""


def _text_problem(value: Any, parts: bool = False) -> str:
    """The message for a text field that is missing, empty or of the wrong type."""
    expected = "a non-empty string or a list of content parts" if parts else "a non-empty string"
    if value is None:
        return f"missing; must be {expected}"
    if isinstance(value, str):
        return f"must be {expected}"
    return f"must be {expected}, got {_describe(value)}"


def _describe(value: Any) -> str:
    """A short description of a bad value for messages: its JSON type, or 'empty ...'."""
    if isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        return f"empty {_json_type(value)}"
    return _json_type(value)


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages about data written as JSON."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    names = {str: "string", list: "array", dict: "object"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)
