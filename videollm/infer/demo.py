"""A Gradio web demo: upload a video, see the frames the model sees, chat about it with streamed answers.

    python -m videollm.demo --model DIR [--host 127.0.0.1] [--port 7860]

The gallery shows the frames sampled with the checkpoint's saved spec, at the size the vision tower gets them.
Each browser tab has its own conversation (`ChatSession`); all tabs share one model (generation takes turns).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import gradio as gr
import numpy as np

from videollm.data.video import VideoDecodeError
from videollm.infer.generate import GenerationSettings
from videollm.infer.placement import PlacementArguments
from videollm.infer.session import ChatSession, InferenceEngine, describe_frames
from videollm.model.checkpoint import checkpoint_problem

# Gradio's default theme loads fonts from the web; this machine (and many servers) has no route there.
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


@dataclass
class DemoArguments:
    model: str = field(metadata={"help": "videollm checkpoint directory (full or adapter)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 0.0.0.0 exposes the demo"})
    port: int = field(default=7860, metadata={"help": "port to listen on"})
    max_upload_mb: int = field(default=200, metadata={"help": "largest video upload in MiB"})


class DemoHandlers:
    """The demo's event handlers, free of widgets so that they can be called directly."""

    def __init__(self, engine: InferenceEngine, settings: GenerationSettings):
        self.engine = engine
        self.settings = settings

    def on_video(self, path: str | None, session: ChatSession | None):
        """Sample the uploaded video's frames and start a new conversation about it."""
        session = session or ChatSession(self.engine)
        if not path:
            session.clear_video()
            return session, [], [], ""
        try:
            video = session.set_video(path)
        except VideoDecodeError as error:
            raise gr.Error(f"{error.reason}; upload another video") from None
        frames = [
            (np.ascontiguousarray(frame.permute(1, 2, 0).numpy()), f"frame {i} · {t:.2f}s")
            for frame, i, t in zip(video.frames, video.indices, video.timestamps)
        ]
        return session, frames, [], f"The model sees {describe_frames(video)}."

    def generation_settings(self, max_new_tokens: float, temperature: float, top_p: float) -> GenerationSettings:
        return replace(
            self.settings,
            max_new_tokens=int(max_new_tokens),
            do_sample=temperature > 0,
            temperature=temperature or 1.0,
            top_p=top_p,
            num_return_sequences=1,
        )

    def on_send(
        self, question: str, session: ChatSession | None, max_new_tokens: float, temperature: float, top_p: float
    ) -> Iterator[tuple[list[dict], str, ChatSession]]:
        """Stream the answer into the chat, one update per generated piece."""
        session = session or ChatSession(self.engine)
        question = (question or "").strip()
        if not question:
            yield session.turns, "", session
            return
        settings = self.generation_settings(max_new_tokens, temperature, top_p)
        history = [*session.turns, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        try:
            for piece in session.ask(question, settings):
                history[-1]["content"] += piece
                yield history, "", session
        except ValueError as error:
            raise gr.Error(str(error)) from None
        yield session.turns, "", session

    def on_reset(self, session: ChatSession | None):
        if session is not None:
            session.reset()
        return [], session


def build_demo(engine: InferenceEngine, settings: GenerationSettings | None = None) -> gr.Blocks:
    """The demo's page for `engine`; `settings` give the initial generation controls."""
    handlers = DemoHandlers(engine, settings or GenerationSettings())
    spec = engine.processor.spec
    sampling = (
        f"{spec.num_frames} frames, uniform" if spec.num_frames else f"{spec.fps:g} fps, at most {spec.max_frames}"
    )
    with gr.Blocks(title="videollm demo", analytics_enabled=False) as demo:
        session = gr.State(None)
        gr.Markdown(f"## videollm\nUpload a video and ask about it. Frames are sampled as in training: {sampling}.")
        with gr.Row():
            with gr.Column(scale=2):
                video = gr.Video(label="Video", sources=["upload"], elem_id="video")
                frames_info = gr.Markdown(elem_id="frames-info")
                gallery = gr.Gallery(
                    label="Sampled frames", columns=4, height=240, allow_preview=False, elem_id="frames"
                )
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat", elem_id="chat", height=420)
                question = gr.Textbox(placeholder="Ask about the video", show_label=False, elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    reset = gr.Button("Reset conversation", elem_id="reset")
                with gr.Accordion("Generation", open=False):
                    max_new_tokens = gr.Slider(
                        1, 1024, value=handlers.settings.max_new_tokens, step=1, label="Max new tokens"
                    )
                    initial = handlers.settings.temperature if handlers.settings.do_sample else 0.0
                    temperature = gr.Slider(0.0, 2.0, value=initial, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=handlers.settings.top_p, step=0.05, label="Top-p")

        video.change(handlers.on_video, [video, session], [session, gallery, chatbot, frames_info])
        ask = dict(fn=handlers.on_send, inputs=[question, session, max_new_tokens, temperature, top_p],
                   outputs=[chatbot, question, session])  # fmt: skip
        send.click(**ask)
        question.submit(**ask)
        reset.click(handlers.on_reset, [session], [chatbot, session])
    return demo


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, max_upload_mb: int = 200, **kwargs):
    """Start the demo's server (returns at once with `prevent_thread_lock=True`)."""
    return demo.queue().launch(
        server_name=host,
        server_port=port,
        theme=THEME,
        ssr_mode=False,
        show_error=True,
        max_file_size=f"{max_upload_mb}mb",
        **kwargs,
    )


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser

    parser = HfArgumentParser([DemoArguments, PlacementArguments, GenerationSettings])
    args, placement, settings = parser.parse_args_into_dataclasses(args=argv)
    device, dtype = placement.resolve_or_exit()
    if problem := checkpoint_problem(args.model):
        sys.exit(f"error: --model: {problem}")
    if problem := settings.problem():
        sys.exit(f"error: {problem}")
    try:
        engine = InferenceEngine.from_checkpoint(args.model, device, dtype)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: --model: {error}")
    launch(build_demo(engine, settings), args.host, args.port, args.max_upload_mb)


if __name__ == "__main__":
    main()
