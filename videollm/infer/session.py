"""What the chat CLI, the server and the demo share: a loaded model behind a lock, streamed generation, chat state.

- `InferenceEngine`: the model and its processor. Videos are decoded with the processor (the checkpoint's saved
  sampling spec), answers come from `generate_answers` (whole answers) or `StreamedAnswer` (text as it is
  generated). One generation runs at a time: a lock around the model, so that threads of a server can share it.
- `StreamedAnswer`: `model.generate` in a thread with a streamer; iterate it for text chunks.
- `ChatSession`: one conversation about one video, its turns, and `/reset`-style operations.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from videollm.data.processor import VideoLLMProcessor
from videollm.data.video import DecodedVideo
from videollm.infer.generate import GenerationSettings, generate_answers
from videollm.infer.placement import load_for_inference


class InferenceEngine:
    """A model and its processor, shared by every conversation; generation is serialised by a lock."""

    def __init__(self, model: nn.Module, processor: VideoLLMProcessor):
        self.model = model
        self.processor = processor
        self.lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> InferenceEngine:
        """Load a full or adapter checkpoint (LoRA adapters are merged for speed) on `device`, in `dtype` (None: as
        saved); `PlacementArguments` gives both from the command line."""
        return cls(*load_for_inference(path, device, dtype))

    def load_video(self, source: str | Path) -> DecodedVideo:
        """Decode the frames the checkpoint's sampling spec selects (what training saw for the same file)."""
        return self.processor.load_video(source)

    def generate(
        self,
        conversations: Sequence[Sequence[dict]],
        videos: Sequence[Sequence[DecodedVideo]],
        settings: GenerationSettings,
        seed: int | None = None,
    ) -> list[list[str]]:
        """Whole answers through `generate_answers`, `settings.num_return_sequences` per conversation; with `seed`,
        sampled answers are drawn from that seed (the same seed, the same answers)."""
        with self.lock, seeded(seed, next(self.model.parameters()).device):
            return generate_answers(self.model, self.processor, conversations, videos, settings)

    def stream(
        self,
        messages: Sequence[dict],
        videos: Sequence[DecodedVideo],
        settings: GenerationSettings,
        seed: int | None = None,
    ) -> StreamedAnswer:
        """Start answering one conversation; iterate the result for text as it is generated. `seed` as in `generate`."""
        return StreamedAnswer(self, messages, videos, settings, seed)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Inside the block torch's generators (CPU and `device`'s) start from `seed`, and are restored after it, so one
    request's seed does not fix the draws of the next; `None` leaves them as they are."""
    if seed is None:
        yield
        return
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class _TokenStreamer(TextIteratorStreamer):
    """Hands over text after every token; `TextIteratorStreamer` waits for a space, which a token stream need not
    contain. Text ending in an incomplete UTF-8 character (decoded as U+FFFD) waits for the next token."""

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("streaming supports one sequence at a time")
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\ufffd") or len(text) <= self.print_len:
            return
        new_text, self.print_len = text[self.print_len :], len(text)
        self.on_finalized_text(new_text)


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _Stop(Exception):
    """Cancelled before generation started."""


class StreamedAnswer:
    """One answer being generated in a background thread; iterating yields its text in pieces.

    The prompt is encoded and decoded as in `generate_answers` (the same processor call and generation settings), and
    the first piece comes without leading whitespace, so the joined pieces, stripped, are what `generate_answers`
    returns, up to float rounding between its cached prefill and the single pass here. An error while encoding or
    generating is raised from the iteration. `close()` (or leaving the iteration early) stops generation at the next
    token. After the iteration: `text` (stripped), `finish_reason` ("stop": end of turn, "length": max_new_tokens
    reached), `prompt_tokens` and `completion_tokens`.
    """

    def __init__(
        self,
        engine: InferenceEngine,
        messages: Sequence[dict],
        videos: Sequence[DecodedVideo],
        settings: GenerationSettings,
        seed: int | None = None,
    ):
        if settings.num_return_sequences != 1:
            raise ValueError(
                f"streaming generates one answer; got num_return_sequences={settings.num_return_sequences}"
            )
        self.text = ""
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._engine = engine
        self._streamer = _TokenStreamer(engine.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._cancel = threading.Event()
        self._error: BaseException | None = None
        self._seed = seed
        self._thread = threading.Thread(target=self._run, args=(list(messages), list(videos), settings), daemon=True)
        self._thread.start()

    def _run(self, messages: list[dict], videos: list[DecodedVideo], settings: GenerationSettings) -> None:
        engine, processor = self._engine, self._engine.processor
        try:
            device = next(engine.model.parameters()).device
            with engine.lock, torch.no_grad(), seeded(self._seed, device):
                if self._cancel.is_set():
                    raise _Stop
                batch = processor([messages], [videos], add_generation_prompt=True)
                batch = {k: v.to(device) for k, v in batch.items()}
                self.prompt_tokens = batch["input_ids"].shape[1]
                output = engine.model.generate(
                    **batch,
                    **settings.generate_kwargs(processor),
                    streamer=self._streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled(self._cancel)]),
                )
            new = output[0, self.prompt_tokens :].tolist()
            eos = processor.tokenizer.eos_token_id
            self.completion_tokens = new.index(eos) + 1 if eos in new else len(new)
            self.finish_reason = "stop" if eos in new else "length"
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._error = error
            self._streamer.text_queue.put(self._streamer.stop_signal)

    def __iter__(self) -> Iterator[str]:
        started = False
        try:
            for piece in self._streamer:
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    self.text += piece
                    yield piece
        finally:
            self.close()
        self._thread.join()
        if self._error is not None and not isinstance(self._error, _Stop):
            raise self._error
        self.text = self.text.rstrip()

    def close(self) -> None:
        """Stop generating (at the next token); what was generated so far stays in `text`."""
        self._cancel.set()


class ChatSession:
    """A conversation about at most one video: its turns so far and the video's sampled frames.

    The video's placeholder goes into the first user turn after the video is set (or after `reset`), as in
    training data, so a multi-turn conversation shows the frames once.
    """

    def __init__(self, engine: InferenceEngine, system: str | None = None):
        self.engine = engine
        self.system = system
        self.video: DecodedVideo | None = None
        self.messages: list[dict] = []

    def set_video(self, source: str | Path) -> DecodedVideo:
        """Decode a video and start a new conversation about it; on a decode error nothing changes."""
        video = self.engine.load_video(source)
        self.video = video
        self.reset()
        return video

    def clear_video(self) -> None:
        self.video = None
        self.reset()

    def reset(self) -> None:
        """Forget the turns; the video stays and is shown again with the next question."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    @property
    def turns(self) -> list[dict]:
        """The user and assistant turns so far (placeholders removed), e.g. for display."""
        token = self.engine.processor.video_token
        return [
            {"role": m["role"], "content": m["content"].replace(f"{token}\n", "")}
            for m in self.messages
            if m["role"] != "system"
        ]

    def ask(self, question: str, settings: GenerationSettings) -> Iterator[str]:
        """Stream the answer to `question`; the turn joins the history once the answer is complete."""
        token = self.engine.processor.video_token
        if token in question:
            raise ValueError(f"the question may not contain the video placeholder {token!r}")
        shown = any(token in m["content"] for m in self.messages)
        content = f"{token}\n{question}" if self.video is not None and not shown else question
        messages = [*self.messages, {"role": "user", "content": content}]
        answer = self.engine.stream(messages, [self.video] if self.video is not None else [], settings)
        yield from answer
        self.messages = [*messages, {"role": "assistant", "content": answer.text}]


def describe_frames(video: DecodedVideo) -> str:
    """One line naming the sampled frames, e.g. ``8 frames: #0 0.00s, #2 0.25s, ...``."""
    frames = ", ".join(f"#{i} {t:.2f}s" for i, t in zip(video.indices, video.timestamps))
    return f"{len(video.indices)} frames of {video.duration:.2f}s: {frames}"
