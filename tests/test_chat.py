"""The chat CLI and the session under it: streaming, history, /reset, /video, /exit, --prompt, sampled frames."""

from __future__ import annotations

import io
import re
import sys

import pexpect
import pytest

from videollm.data.processor import VideoLLMProcessor
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.infer.chat import ASSISTANT_PREFIX, USER_PROMPT, ChatCLI
from videollm.infer.chat import main as chat_main
from videollm.infer.generate import GenerationSettings, generate_answers
from videollm.infer.session import ChatSession

SETTINGS = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    generate_dataset(SyntheticConfig(output_dir=str(data), num_train=0, num_eval=0, num_test=2))
    return sorted((data / "videos" / "test").glob("*.mp4"))


@pytest.fixture
def encoded(engine, monkeypatch):
    """Records the messages and frame indices of every prompt the model is given."""
    calls = []
    encode = engine.processor.encode

    def spy(messages, videos=(), **kwargs):
        calls.append(([dict(m) for m in messages], [list(v.indices) for v in videos]))
        return encode(messages, videos, **kwargs)

    monkeypatch.setattr(engine.processor, "encode", spy)
    return calls


def training_indices(checkpoint, clip) -> list[int]:
    """The frames training would use: the checkpoint's processor, as `ConversationDataset` loads videos."""
    processor = VideoLLMProcessor.from_pretrained(checkpoint)
    return list(processor.load_video(clip).indices)


class RecordingStream(io.StringIO):
    """A stdout that records every write and flush, to see what was on screen while an answer was generated."""

    def __init__(self):
        super().__init__()
        self.events: list[str | None] = []  # written text, None for a flush

    def write(self, text):
        self.events.append(text)
        return super().write(text)

    def flush(self):
        self.events.append(None)

    def answers_as_flushed_pieces(self) -> list[list[str]]:
        """For each answer, the pieces that were each written and flushed before the next prompt."""
        turns, pieces, in_answer = [], [], False
        for previous, event in zip(self.events, self.events[1:]):
            if event == ASSISTANT_PREFIX:
                in_answer, pieces = True, []
            elif event == USER_PROMPT and in_answer:
                in_answer = False
                turns.append(pieces[:-1])  # the last one is the newline that ends the turn
            elif event is None and in_answer and previous not in (None, ASSISTANT_PREFIX):
                pieces.append(previous)
        return turns


def test_streamed_answer_arrives_in_pieces_and_equals_generate_answers(engine, clips):
    session = ChatSession(engine)
    video = session.set_video(clips[0])
    pieces = list(session.ask("What color is the shape?", SETTINGS))

    assert len(pieces) > 1
    expected = generate_answers(
        engine.model,
        engine.processor,
        [[{"role": "user", "content": "<video>\nWhat color is the shape?"}]],
        [[video]],
        SETTINGS,
    )
    assert "".join(pieces).strip() == expected[0][0] == session.messages[-1]["content"]


def test_cli_two_turns_stream_reset_video_switch_and_exit(engine, clips, checkpoint, encoded):
    out = RecordingStream()
    cli = ChatCLI(ChatSession(engine), SETTINGS, out)
    assert cli.set_video(str(clips[0]))
    lines = iter(["What color is it?", "And which way does it move?", "/reset", "What shape is it?",
                  f"/video {clips[1]}", "Where does it go?", "/exit", "never read"])  # fmt: skip
    cli.run(lambda prompt: (out.write(prompt), next(lines))[1])

    # Four answers, each shown in several pieces, each flushed before the next was generated.
    turns = out.answers_as_flushed_pieces()
    assert len(turns) == 4 and "conversation cleared" in out.getvalue()
    assert all(len(pieces) > 1 for pieces in turns), turns
    assert "".join(turns[-1]).strip() == cli.session.messages[-1]["content"]

    # What the model was given: turn 2 saw turn 1, /reset dropped both, /video started over on the new clip.
    prompts = [[m["content"] for m in messages if m["role"] == "user"] for messages, _ in encoded]
    assert prompts == [
        ["<video>\nWhat color is it?"],
        ["<video>\nWhat color is it?", "And which way does it move?"],
        ["<video>\nWhat shape is it?"],
        ["<video>\nWhere does it go?"],
    ]
    frames = [indices for _, indices in encoded]
    assert frames[:3] == [[training_indices(checkpoint, clips[0])]] * 3
    assert frames[3] == [training_indices(checkpoint, clips[1])]
    assert cli.session.video.path == str(clips[1])


def test_cli_reports_an_unreadable_video_and_keeps_the_old_one(engine, clips, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    out = io.StringIO()
    cli = ChatCLI(ChatSession(engine), SETTINGS, out)
    cli.set_video(str(clips[0]))
    assert cli.command(f"/video {broken}")
    assert "error: cannot read video" in out.getvalue() and cli.session.video.path == str(clips[0])


def test_prompt_mode_prints_the_answer_and_exits(checkpoint, clips, engine, capsys):
    chat_main(
        ["--model", str(checkpoint), "--video", str(clips[0]), "--prompt", "What moves?", "--max_new_tokens", "8"]
    )
    video = engine.load_video(clips[0])
    expected = engine.generate([[{"role": "user", "content": "<video>\nWhat moves?"}]], [[video]], SETTINGS)[0][0]
    assert capsys.readouterr().out == expected + "\n"


def test_prompt_mode_rejects_a_missing_video_with_one_line(checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="--video: .* does not exist"):
        chat_main(["--model", str(checkpoint), "--video", str(tmp_path / "none.mp4"), "--prompt", "hi"])


def test_interactive_chat_through_a_pty(checkpoint, clips):
    """The real entry point, typed at like a person: two turns, /reset, /video, /exit; frames as in training."""
    args = ["-m", "videollm.chat", "--model", str(checkpoint), "--video", str(clips[0]), "--max_new_tokens", "6"]
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120)

    def answer(question: str) -> str:
        child.sendline(question)
        child.expect_exact(ASSISTANT_PREFIX)
        child.expect(r"(?s)(.*?)\r\nuser: ")  # the answer (it may span lines), then the next prompt
        return child.match.group(1)

    def shown_frames() -> list[int]:
        child.expect(r"video: .*?: (.*)\)\r\n")
        return [int(i) for i in re.findall(r"#(\d+)", child.match.group(1))]

    try:
        assert shown_frames() == training_indices(checkpoint, clips[0])
        child.expect_exact(USER_PROMPT)
        assert answer("What color is it?").strip()
        assert answer("Which way does it move?").strip()
        child.sendline("/reset")
        child.expect_exact("conversation cleared")
        child.sendline(f"/video {clips[1]}")
        assert shown_frames() == training_indices(checkpoint, clips[1])
        child.expect_exact(USER_PROMPT)
        assert answer("And this one?").strip()
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
