"""An OpenAI-compatible HTTP server for a videollm checkpoint (FastAPI + uvicorn).

    python -m videollm.serve --model DIR --media_root DIR [--host 127.0.0.1] [--port 8000]

Endpoints: `GET /v1/models`, `POST /v1/chat/completions` (streamed as server-sent events with `"stream": true`).
A user message's content may be a string or a list of parts:

    {"type": "text", "text": "What moves?"}
    {"type": "video_url", "video_url": {"url": "clips/a.mp4"}}          # a path under --media_root
    {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,..."}}
    {"type": "video", "video": "clips/a.mp4"}                           # the Qwen-VL / ms-swift spelling

A request's `seed` makes its sampled answers repeatable (OpenAI's `seed` field).
Frames are sampled with the checkpoint's saved spec. Requests are validated before any generation: a path outside
the media root (403), a missing file (404), a body over --max_upload_mb (413) and an undecodable video (400) get an
OpenAI-style error object (`{"error": {"message", "type", "param", "code"}}`) and the server goes on serving.

Concurrency: requests are decoded and validated in parallel threads; generation holds one lock around the model,
so concurrent requests are answered one after another (no batching across requests).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from videollm.data.video import DecodedVideo
from videollm.infer.generate import GenerationSettings
from videollm.infer.media import MediaError, load_video_reference
from videollm.infer.placement import PlacementArguments
from videollm.infer.session import InferenceEngine
from videollm.model.checkpoint import checkpoint_problem


@dataclass
class ServeArguments:
    model: str = field(metadata={"help": "videollm checkpoint directory (full or adapter)"})
    media_root: str | None = field(
        default=None, metadata={"help": "directory that video paths in requests resolve under (none: data URLs only)"}
    )
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 exposes the server"})
    port: int = field(default=8000, metadata={"help": "port to listen on (0: any free port)"})
    served_model_name: str | None = field(default=None, metadata={"help": "model id clients send (default: dir name)"})
    max_upload_mb: float = field(default=64.0, metadata={"help": "largest request body in MiB, base64 videos included"})


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this server uses; others are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class APIError(Exception):
    """An error answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _text_and_videos(message: _Message, index: int, video_token: str) -> tuple[str, list[str]]:
    """A message's text, with the placeholder where each video part was, and its video references."""
    where = f"messages[{index}].content"
    if message.content is None or isinstance(message.content, str):
        text = message.content or ""
        if video_token in text:
            raise APIError(400, f"{where}: the text may not contain {video_token!r}; send videos as video parts", where)
        return text, []
    pieces, videos = [], []
    for number, part in enumerate(message.content):
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            if video_token in part["text"]:
                raise APIError(
                    400, f"{where}[{number}]: the text may not contain {video_token!r}", f"{where}[{number}]"
                )
            pieces.append(part["text"])
        elif kind in ("video_url", "video"):
            reference = part.get(kind)
            reference = reference.get("url") if isinstance(reference, dict) else reference
            if not isinstance(reference, str):
                raise APIError(400, f"{where}[{number}]: a {kind} part needs a path or data URL", f"{where}[{number}]")
            pieces.append(video_token)
            videos.append(reference)
        elif kind in ("image_url", "image", "input_audio", "file"):
            raise APIError(400, f"{where}[{number}]: {kind} parts are not supported; send text and video parts", where)
        else:
            raise APIError(400, f"{where}[{number}]: unknown content part type {kind!r}", f"{where}[{number}]")
    return "\n".join(pieces), videos


def to_conversation(messages: list[_Message], video_token: str) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> processor messages (placeholders for videos) and the video references in order."""
    conversation, references = [], []
    for index, message in enumerate(messages):
        text, videos = _text_and_videos(message, index, video_token)
        role = "system" if message.role == "developer" else message.role
        if videos and role != "user":
            raise APIError(400, f"messages[{index}]: videos are only accepted in user messages", f"messages[{index}]")
        conversation.append({"role": role, "content": text})
        references.extend(videos)
    if conversation[-1]["role"] != "user":
        raise APIError(400, "the last message must come from the user", "messages")
    return conversation, references


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 when it exceeds `limit` bytes (by its Content-Length or as it arrives)."""
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else 0
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            size = len(body)
            break
    if size > limit:
        # Not read further than this: a client still sending gets the 413 when it reads, or a closed connection.
        raise APIError(
            413, f"request body is larger than the server's limit of {limit / 2**20:g} MiB", code="too_large"
        )
    return bytes(body)


def create_app(
    engine: InferenceEngine,
    model_name: str,
    media_root: str | Path | None = None,
    settings: GenerationSettings | None = None,
    max_upload_bytes: int = 64 * 2**20,
) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; `settings` are the defaults a request may override."""
    defaults = settings or GenerationSettings()
    created = int(time.time())
    app = FastAPI(title="videollm", summary="OpenAI-compatible chat completions with video")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return _error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(400, str(error))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        return _error_response(500, f"internal error: {type(error).__name__}: {error}")

    @app.get("/v1/models")
    async def list_models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "videollm"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    def _settings(req: ChatCompletionRequest) -> GenerationSettings:
        max_tokens = req.max_completion_tokens or req.max_tokens or defaults.max_new_tokens
        chosen = replace(defaults, max_new_tokens=max_tokens, num_return_sequences=req.n)
        if req.temperature is not None:
            # temperature 0 means greedy, as in OpenAI's API
            chosen = replace(chosen, do_sample=req.temperature > 0, temperature=req.temperature or 1.0)
        if req.top_p is not None:
            chosen = replace(chosen, top_p=req.top_p)
        return chosen

    def _load_videos(references: list[str]) -> list[DecodedVideo]:
        try:
            return [load_video_reference(engine.processor, r, media_root, max_upload_bytes) for r in references]
        except MediaError as error:
            raise APIError(error.status, str(error), "messages", "invalid_video") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, max_upload_bytes)
        try:
            req = ChatCompletionRequest.model_validate(json.loads(body))
        except json.JSONDecodeError as error:
            raise APIError(400, f"the request body is not valid JSON: {error}") from None
        except UnicodeDecodeError as error:  # json.loads guesses UTF-8/16/32 from the bytes; other encodings fail here
            raise APIError(400, f"the request body is not UTF-8 encoded JSON: {error.reason}") from None
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors(include_url=False))
            raise APIError(400, problems) from None
        if req.model is not None and req.model != model_name:
            raise APIError(
                404, f"model {req.model!r} not found; this server serves {model_name!r}", "model", "model_not_found"
            )
        if req.stream and req.n != 1:
            raise APIError(400, "streaming supports n=1 only", "n")
        conversation, references = to_conversation(req.messages, engine.processor.video_token)
        settings = _settings(req)
        videos = await run_in_threadpool(_load_videos, references)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return await _stream(conversation, videos, settings, completion_id, include_usage, req.seed)
        try:
            answers = await run_in_threadpool(engine.generate, [conversation], [videos], settings, req.seed)
        except ValueError as error:  # e.g. SampleTooLongError: the prompt does not fit
            raise APIError(400, str(error)) from None
        tokenizer = engine.processor.tokenizer
        choices = []
        for index, answer in enumerate(answers[0]):
            # generate_answers returns text only: an answer of max_tokens tokens is taken to have been cut.
            cut = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) >= settings.max_new_tokens
            message = {"role": "assistant", "content": answer}
            choices.append(
                {"index": index, "message": message, "finish_reason": "length" if cut else "stop", "logprobs": None}
            )
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
        }

    async def _stream(conversation, videos, settings, completion_id, include_usage, seed) -> StreamingResponse:
        answer = engine.stream(conversation, videos, settings, seed)
        pieces = iter(answer)
        try:
            # The first piece (or the end) comes once the prompt is encoded and generation runs, so a prompt that
            # cannot be encoded is still answered with a status code, not inside the stream.
            first = await run_in_threadpool(next, pieces, None)
        except ValueError as error:
            raise APIError(400, str(error)) from None

        def chunk(delta: dict, finish_reason: str | None = None, **extra) -> str:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_name,
                "choices": [choice] if delta is not None else [],
                **extra,
            }
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        def events() -> Iterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                if first is not None:
                    yield chunk({"content": first})
                    for piece in pieces:
                        yield chunk({"content": piece})
                yield chunk({}, answer.finish_reason or "stop")
                if include_usage:
                    usage = {
                        "prompt_tokens": answer.prompt_tokens,
                        "completion_tokens": answer.completion_tokens,
                        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
                    }
                    yield chunk(None, usage=usage)
            except Exception as error:  # after the headers went out, an error can only be reported in the stream
                yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
            finally:
                answer.close()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def main(argv: list[str] | None = None) -> None:
    import sys

    import uvicorn
    from transformers import HfArgumentParser

    parser = HfArgumentParser([ServeArguments, PlacementArguments, GenerationSettings])
    args, placement, settings = parser.parse_args_into_dataclasses(args=argv)
    device, dtype = placement.resolve_or_exit()
    if problem := checkpoint_problem(args.model):
        sys.exit(f"error: --model: {problem}")
    if problem := settings.problem():
        sys.exit(f"error: {problem}")
    if args.media_root is not None and not Path(args.media_root).is_dir():
        sys.exit(f"error: --media_root: {args.media_root} is not a directory")
    if args.max_upload_mb <= 0:
        sys.exit(f"error: --max_upload_mb must be > 0, got {args.max_upload_mb}")
    try:
        engine = InferenceEngine.from_checkpoint(args.model, device, dtype)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: --model: {error}")
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, name, args.media_root, settings, int(args.max_upload_mb * 2**20))
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
