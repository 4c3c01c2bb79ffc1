"""The Gradio demo: its handlers directly, then the page in headless Chromium (upload, sampled frames, chat)."""

from __future__ import annotations

import os
import shutil
import socket

import gradio as gr
import pytest

from videollm.data.processor import VideoLLMProcessor
from videollm.data.synthetic import SyntheticConfig, generate_dataset
from videollm.infer.demo import DemoHandlers, build_demo, launch
from videollm.infer.generate import GenerationSettings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the networking flags Chromium keeps trying to reach Google's services, which this machine refuses.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
SETTINGS = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    generate_dataset(SyntheticConfig(output_dir=str(data), num_train=0, num_eval=0, num_test=1))
    return data / "videos" / "test" / "test_00000.mp4"


def training_frames(checkpoint, clip):
    """The frames training would use: the checkpoint's processor, as the training dataset loads videos."""
    processor = VideoLLMProcessor.from_pretrained(checkpoint)
    return processor.load_video(clip)


def test_handlers_show_the_training_frames_and_stream_the_chat(engine, checkpoint, clip, encoded):
    handlers = DemoHandlers(engine, SETTINGS)
    session, gallery, chat, info = handlers.on_video(str(clip), None)
    expected = training_frames(checkpoint, clip)
    assert [caption for _, caption in gallery] == [
        f"frame {i} · {t:.2f}s" for i, t in zip(expected.indices, expected.timestamps)
    ]
    assert gallery[0][0].shape == (32, 32, 3) and chat == [] and "3 frames" in info

    shown = [
        (history[-1]["content"], cleared)
        for history, cleared, session in handlers.on_send("What color is it?", session, 8, 0.0, 1.0)
    ]
    partial = [text for text, _ in shown]
    assert len(set(partial)) > 2 and all(b.startswith(a) for a, b in zip(partial, partial[1:]))
    history, cleared = session.turns, shown[-1][1]
    assert [m["role"] for m in history] == ["user", "assistant"] and cleared == "" and history[1]["content"]
    *_, (history, _, session) = handlers.on_send("And its shape?", session, 8, 0.0, 1.0)
    assert len(history) == 4 and encoded == [[list(expected.indices)]] * 2

    assert handlers.on_reset(session)[0] == [] and session.turns == []


def test_an_undecodable_upload_is_reported(engine, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(gr.Error, match="upload another video"):
        DemoHandlers(engine, SETTINGS).on_video(str(broken), None)


def test_the_page_in_headless_chromium(engine, checkpoint, clip, encoded, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: CI must `apt-get install chromium`")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    demo = build_demo(engine, SETTINGS)
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    expected = training_frames(checkpoint, clip)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(90_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#video input[type=file]", str(clip))
            page.wait_for_function("document.querySelectorAll('#frames img').length === 3")
            frames_text = ", ".join(f"#{i} {t:.2f}s" for i, t in zip(expected.indices, expected.timestamps))
            assert frames_text in page.inner_text("#frames-info")

            page.fill("#question textarea", "What color is the shape?")
            page.click("#send")
            # the answer streams in; the chat's status tracker hides once the handler has returned
            page.locator("#chat [data-testid=bot]").first.wait_for()
            page.wait_for_function(
                "document.querySelector('#chat [data-testid=status-tracker]').classList.contains('hide')"
                " && document.querySelector('#chat [data-testid=bot]').innerText.trim().length > 0"
            )
            question = page.inner_text("#chat [data-testid=user]")
            answer = page.inner_text("#chat [data-testid=bot]")
            screenshot = tmp_path / "demo.png"
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
    finally:
        demo.close()
    assert question.strip() == "What color is the shape?" and answer.strip()
    assert screenshot.stat().st_size > 10_000
    assert encoded == [[list(expected.indices)]]
