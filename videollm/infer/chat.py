"""Terminal chat with a videollm checkpoint, answers streamed as they are generated.

    python -m videollm.chat --model DIR --video clip.mp4                     # interactive
    python -m videollm.chat --model DIR --video clip.mp4 --prompt "What moves?"  # one answer, for scripts

Commands in the interactive mode: `/video PATH` switches to another video (and starts a new conversation),
`/reset` forgets the conversation, `/frames` shows the sampled frames, `/help`, `/exit` (or end of input).
Frames are sampled with the sampling spec saved in the checkpoint, as in training.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from transformers import HfArgumentParser

from videollm.data.video import VideoDecodeError
from videollm.infer.generate import GenerationSettings
from videollm.infer.placement import PlacementArguments
from videollm.infer.session import ChatSession, InferenceEngine, describe_frames
from videollm.model.checkpoint import checkpoint_problem

USER_PROMPT = "user: "
ASSISTANT_PREFIX = "assistant: "
HELP = "commands: /video PATH (switch video, new conversation) | /reset (forget the conversation) | /frames | /exit"


@dataclass
class ChatArguments:
    model: str = field(metadata={"help": "videollm checkpoint directory (full or adapter)"})
    video: str | None = field(default=None, metadata={"help": "video to talk about (switch later with /video PATH)"})
    prompt: str | None = field(default=None, metadata={"help": "answer this one question, print the answer and exit"})
    system: str | None = field(default=None, metadata={"help": "system prompt"})


class ChatCLI:
    """The interactive loop over a `ChatSession`: reads lines, runs commands, streams answers to `out`."""

    def __init__(self, session: ChatSession, settings: GenerationSettings, out: TextIO | None = None):
        self.session = session
        self.settings = settings
        self.out = out or sys.stdout

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def set_video(self, path: str) -> bool:
        try:
            video = self.session.set_video(path)
        except VideoDecodeError as error:
            self.say(f"error: {error}")
            return False
        self.say(f"video: {path} ({describe_frames(video)})")
        return True

    def answer(self, question: str) -> None:
        """Stream one answer, flushing after every piece so that it shows as it is generated."""
        self.out.write(ASSISTANT_PREFIX)
        self.out.flush()
        pieces = self.session.ask(question, self.settings)
        try:
            for piece in pieces:
                self.out.write(piece)
                self.out.flush()
        except ValueError as error:  # e.g. SampleTooLongError: the conversation no longer fits; /reset helps
            self.say(f"\nerror: {error}")
            return
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat; the turn is not kept
            pieces.close()
            self.say(" [stopped]")
            return
        self.say("")

    def command(self, line: str) -> bool:
        """Run a /command; False when the chat should end."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.session.reset()
            self.say("conversation cleared")
        elif name == "/video" and argument:
            self.set_video(argument)
        elif name == "/frames":
            self.say(describe_frames(self.session.video) if self.session.video else "no video")
        else:
            self.say(HELP)
        return True

    def run(self, read_line: Callable[[str], str] = input) -> None:
        """Chat until /exit or end of input; `read_line(prompt)` returns the next line or raises EOFError."""
        self.say(HELP)
        while True:
            try:
                line = read_line(USER_PROMPT).strip()
            except (EOFError, KeyboardInterrupt):
                self.say("")
                return
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
            else:
                self.answer(line)


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser([ChatArguments, PlacementArguments, GenerationSettings])
    args, placement, settings = parser.parse_args_into_dataclasses(args=argv)
    device, dtype = placement.resolve_or_exit()
    if problem := checkpoint_problem(args.model):
        sys.exit(f"error: --model: {problem}")
    if problem := settings.problem():
        sys.exit(f"error: {problem}")
    if args.video is not None and not Path(args.video).exists():
        sys.exit(f"error: --video: {args.video} does not exist")
    if settings.num_return_sequences != 1:
        sys.exit("error: --num_return_sequences: the chat streams one answer; use 1")
    try:
        engine = InferenceEngine.from_checkpoint(args.model, device, dtype)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: --model: {error}")
    cli = ChatCLI(ChatSession(engine, system=args.system), settings)
    if args.prompt is not None:
        if args.video is not None:
            try:
                cli.session.set_video(args.video)
            except VideoDecodeError as error:
                sys.exit(f"error: --video: {error}")
        try:
            for piece in cli.session.ask(args.prompt, settings):
                cli.out.write(piece)
                cli.out.flush()
        except ValueError as error:
            sys.exit(f"error: {error}")
        cli.say("")
        return
    if args.video is not None and not cli.set_video(args.video):
        sys.exit(1)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    cli.run()


if __name__ == "__main__":
    main()
