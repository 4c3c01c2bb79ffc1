"""Video references from untrusted clients (the server, the demo): paths confined to a media root, base64 data URLs.

Every reference ends in `VideoLLMProcessor.load_video`, so frames are sampled with the checkpoint's saved spec.
A reference that may not be used or cannot be read raises `MediaError`, which carries the HTTP status to answer
with: the caller reports it and goes on serving.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import tempfile
from pathlib import Path

from videollm.data.processor import VideoLLMProcessor
from videollm.data.video import DecodedVideo, VideoDecodeError

# Container suffix for the MIME types a data URL may carry; the decoder sniffs the content anyway, the suffix only
# helps it pick a demuxer.
_MIME_SUFFIXES = {
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/x-matroska": ".mkv",
    "video/quicktime": ".mov",
    "video/x-msvideo": ".avi",
    "video/mpeg": ".mpg",
    "application/octet-stream": ".mp4",
}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


class MediaError(ValueError):
    """A video reference that is refused or unreadable; `status` is the HTTP status that describes it (4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def resolve_media_path(reference: str, media_root: str | Path | None) -> Path:
    """The file a client's path names, which must lie inside `media_root` (symlinks resolved).

    Relative paths start from the media root; absolute paths and ``file://`` URLs are accepted when they point
    inside it. Raises `MediaError` (403) for anything outside, (400) without a media root, (404) for no such file.
    """
    if media_root is None:
        raise MediaError(
            f"video path {reference!r} refused: the server has no media root (start it with --media_root DIR), "
            "send the video as a base64 data URL instead"
        )
    path = reference.removeprefix("file://")
    root = Path(media_root).resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise MediaError(f"video path {reference!r} is outside the server's media root", status=403)
    if not resolved.is_file():
        raise MediaError(f"video {reference!r} not found under the media root", status=404)
    return resolved


def decode_data_url(url: str, max_bytes: int) -> tuple[bytes, str]:
    """The bytes of a base64 ``data:`` URL and a file suffix for them.

    Raises `MediaError`: malformed (400) or larger than `max_bytes` (413).
    """
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise MediaError("a video data URL must look like 'data:video/mp4;base64,<data>'")
    payload = url[match.end() :]
    # 4 base64 characters carry 3 bytes: refuse before decoding anything large.
    if len(payload) * 3 // 4 > max_bytes:
        raise MediaError(f"video data is larger than the limit of {_megabytes(max_bytes)}", status=413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("video data URL: the data is not valid base64") from None
    if not data:
        raise MediaError("video data URL: the data is empty")
    mime = (match.group("mime") or "application/octet-stream").lower()
    return data, _MIME_SUFFIXES.get(mime, ".mp4")


def load_video_reference(
    processor: VideoLLMProcessor, reference: str, media_root: str | Path | None, max_bytes: int
) -> DecodedVideo:
    """Decode a client's video (a path under `media_root` or a base64 data URL) with the processor's sampling spec."""
    if not isinstance(reference, str) or not reference.strip():
        raise MediaError("a video part needs a non-empty path or data URL")
    if re.match(r"^[a-z][a-z0-9+.-]*://", reference, re.I) and not reference.startswith("file://"):
        raise MediaError(f"video URL {reference[:80]!r}: remote URLs are not fetched; send a path or a base64 data URL")
    try:
        if not reference.startswith("data:"):
            return processor.load_video(resolve_media_path(reference, media_root))
        data, suffix = decode_data_url(reference, max_bytes)
        handle, name = tempfile.mkstemp(prefix="videollm-upload-", suffix=suffix)
        try:
            with os.fdopen(handle, "wb") as upload:
                upload.write(data)
            return processor.load_video(name)
        finally:
            os.unlink(name)
    except VideoDecodeError as error:
        # Name the client's reference, not the server's temporary file.
        shown = "the uploaded video" if reference.startswith("data:") else repr(reference)
        raise MediaError(f"cannot read {shown}: {error.reason}") from None


def _megabytes(n: int) -> str:
    return f"{n / 2**20:g} MiB"
