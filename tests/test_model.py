"""The composite model, its processor and the checkpoint layout, on tiny models built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

import videollm  # noqa: F401  (registers the Auto classes)
from videollm.data.processor import IGNORE_INDEX, SampleTooLongError
from videollm.data.sampling import SamplingSpec
from videollm.data.video import DecodedVideo
from videollm.export import main as export_main
from videollm.model.checkpoint import load_model, save_checkpoint
from videollm.model.presets import build_tiny_model_and_processor, tiny_text_config, tiny_vision_config
from videollm.model.trainable import TrainablePolicy, apply_trainable_policy

PROJECTORS = ["mlp", "pool", "qformer", "stc"]


def make_video(num_frames: int, seed: int = 0, size: int = 32) -> DecodedVideo:
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (num_frames, 3, size, size), dtype=torch.uint8, generator=generator)
    return DecodedVideo(
        frames=frames,
        indices=list(range(num_frames)),
        timestamps=[i / 8 for i in range(num_frames)],
        duration=num_frames / 8,
        path=f"synthetic-{num_frames}",
    )


def conversation(question: str, answer: str, video: bool = True) -> list[dict]:
    prefix = "<video>\n" if video else ""
    return [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]


def mixed_batch(processor):
    """A 4-frame video, an 8-frame video and a text-only sample in one batch."""
    samples = [
        processor.encode(conversation("What color?", "red"), [make_video(4, 1)], "four"),
        processor.encode(conversation("Which way does it move?", "left"), [make_video(8, 2)], "eight"),
        processor.encode(conversation("Say hi.", "hi", video=False), [], "text"),
    ]
    return samples, processor.collate([s.as_features() for s in samples])


@pytest.fixture(params=PROJECTORS)
def tiny(request):
    torch.manual_seed(0)
    return build_tiny_model_and_processor(request.param, sampling=SamplingSpec(num_frames=4))


def test_forward_backward_generate_mixed_batch(tiny):
    model, processor = tiny
    samples, batch = mixed_batch(processor)
    layout = model.config.visual_token_layout()
    video_token = model.config.video_token_id
    expected = [layout.count(4), layout.count(8), 0]
    assert [s.input_ids.count(video_token) for s in samples] == expected
    assert processor.layout == layout

    model.train()
    out = model(**batch)
    produced = [f.shape[0] for f in model.model.get_video_features(batch["pixel_values_videos"], batch["video_num_frames"])]
    assert produced == expected[:2]
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.projector.parameters().__next__().grad is not None

    model.eval()
    gen_batch = processor(
        [conversation("What color?", "")[:1], conversation("Which way?", "")[:1], conversation("Hi", "", video=False)[:1]],
        [[make_video(4, 1)], [make_video(8, 2)], []],
    )
    generated = model.generate(**gen_batch, max_new_tokens=3, do_sample=False)
    assert generated.shape == (3, gen_batch["input_ids"].shape[1] + 3)


def test_batched_left_padded_generation_equals_single(tiny):
    model, processor = tiny
    model.eval()
    prompts = [conversation("What color?", "")[:1], conversation("Which way does the red square move now?", "")[:1]]
    videos = [[make_video(4, 1)], [make_video(4, 3)]]
    batch = processor(prompts, videos)
    batched = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
    for i in range(2):
        single = processor([prompts[i]], [videos[i]])
        alone = model.generate(**single, max_new_tokens=4, do_sample=False)[:, single["input_ids"].shape[1] :]
        assert torch.equal(alone[0], batched[i])


def test_text_only_batch_still_runs_vision_tower(tiny):
    model, processor = tiny
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    batch = processor.collate([processor.encode(conversation("Say hi.", "hi", video=False), []).as_features()])
    model.train()
    model(**batch).loss.backward()
    assert calls == [1]
    assert all(p.grad is not None for p in model.model.projector.parameters())


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_text_only_batch_of_a_feature_cache_run_skips_what_video_batches_skip(projector_type):
    """Fed by a tower-level cache, no rank runs the tower, so a text-only batch must not (under ZeRO-3 that rank
    would wait forever in the tower's parameter gather); the trained projector still gets its gradient. With a
    projector-level cache nothing of the vision path runs."""
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(projector_type, sampling=SamplingSpec(num_frames=4))
    tower_calls, projector_calls = [], []
    model.model.vision_tower.register_forward_hook(lambda *args: tower_calls.append(1))
    model.model.projector.register_forward_hook(lambda *args: projector_calls.append(1))
    batch = processor.collate([processor.encode(conversation("Say hi.", "hi", video=False), []).as_features()])
    model.train()

    model.use_cached_vision("tower")
    model(**batch).loss.backward()
    assert (tower_calls, projector_calls) == ([], [1])
    assert all(p.grad is not None for p in model.model.projector.parameters())

    model.use_cached_vision("projector")
    model(**batch).loss.backward()
    assert (tower_calls, projector_calls) == ([], [1])

    model.use_cached_vision(None)
    model(**batch).loss.backward()
    assert (tower_calls, projector_calls) == ([1], [1, 1])
    with pytest.raises(ValueError, match="not one of"):
        model.use_cached_vision("pixels")


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_save_and_auto_load_gives_identical_logits(tmp_path, projector_type):
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor(projector_type, sampling=SamplingSpec(fps=2.0, max_frames=6))
    model.eval()
    _, batch = mixed_batch(processor)
    save_checkpoint(model, processor, tmp_path)

    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "VideoLLMConfig"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    assert reloaded_processor.spec == processor.spec
    assert reloaded_processor.spec.fps == 2.0 and reloaded_processor.spec.frame_size == 32
    assert reloaded_processor.layout == processor.layout
    assert reloaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_a_checkpoint_of_mixed_dtypes_loads_every_weight_as_saved(tmp_path):
    """After bf16 training the frozen tower is bf16 and what trained is fp32: loading without a dtype gives back the
    fp32 weights unrounded (transformers would load all of them in the dtype of the model's first weight, bf16)."""
    torch.manual_seed(0)
    model, processor = build_tiny_model_and_processor("mlp")
    model.model.vision_tower.to(torch.bfloat16)
    save_checkpoint(model, processor, tmp_path)
    reloaded, _ = load_model(tmp_path)
    saved = model.state_dict()
    for name, value in reloaded.state_dict().items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, saved[name].float()), name


def test_label_masking_two_turns():
    _, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4))
    tokenizer = processor.tokenizer
    messages = [
        {"role": "user", "content": "<video>\nWhat color?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "a circle"},
    ]
    sample = processor.encode(messages, [make_video(4)])
    visual = processor.layout.count(4)

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    video_id = processor.video_token_id
    prompt_1 = ids("<|im_start|>user\n") + [video_id] * visual + ids("\nWhat color?<|im_end|>\n<|im_start|>assistant\n")
    answer_1 = ids("red<|im_end|>\n")
    prompt_2 = ids("<|im_start|>user\nAnd the shape?<|im_end|>\n<|im_start|>assistant\n")
    answer_2 = ids("a circle<|im_end|>\n")
    assert sample.input_ids == prompt_1 + answer_1 + prompt_2 + answer_2
    expected_labels = [IGNORE_INDEX] * len(prompt_1) + answer_1 + [IGNORE_INDEX] * len(prompt_2) + answer_2
    assert sample.labels == expected_labels


def test_truncation_never_cuts_visual_tokens():
    _, processor = build_tiny_model_and_processor("mlp", sampling=SamplingSpec(num_frames=4))
    visual = processor.layout.count(4)
    processor.max_length = visual  # the video fits only if nothing precedes it
    with pytest.raises(SampleTooLongError, match=r"sample 'clip-7': \d+ tokens \(64 visual\) do not fit max_length=64"):
        processor.encode(conversation("What color?", "red"), [make_video(4)], "clip-7")
    processor.max_length = None
    full = processor.encode(conversation("What color?", "red " * 30), [make_video(4)], "long-answer")
    first_answer = next(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    processor.max_length = first_answer + 5
    sample = processor.encode(conversation("What color?", "red " * 30), [make_video(4)], "long-answer")
    assert sample.input_ids == full.input_ids[: first_answer + 5]
    assert sample.labels == full.labels[: first_answer + 5]
    assert sample.input_ids.count(processor.video_token_id) == visual


def test_timestamps_in_prompt():
    _, processor = build_tiny_model_and_processor("pool", sampling=SamplingSpec(num_frames=4))
    processor.timestamps_in_prompt = True
    sample = processor.encode(conversation("What color?", "red"), [make_video(4)])
    text = processor.decode([t for t in sample.input_ids if t != processor.video_token_id])
    assert "The video lasts 0.5 s; 4 frames sampled at 0.0s, 0.1s, 0.2s, 0.4s." in text


@pytest.fixture
def pretrained_parts(tmp_path):
    """Tiny vision tower and LLM saved as if they were hub checkpoints."""
    from transformers import AutoModel

    from videollm.data.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    vision_dir, llm_dir = tmp_path / "siglip", tmp_path / "qwen"
    AutoModel.from_config(tiny_vision_config("siglip")).save_pretrained(vision_dir)
    # the tokenizer lacks nothing here; drop the video token to exercise "added and embeddings resized"
    AutoModelForCausalLM.from_config(tiny_text_config(len(tokenizer) - 1)).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return vision_dir, llm_dir


def test_build_from_pretrained_parts_loads_their_weights(pretrained_parts):
    from transformers import AutoModel

    from videollm.model.builder import build_model_and_processor

    vision_dir, llm_dir = pretrained_parts
    model, processor = build_model_and_processor(str(vision_dir), str(llm_dir), projector_type="pool", pool_output_size=[4, 2, 2])
    vision = AutoModel.from_pretrained(vision_dir)
    llm = AutoModelForCausalLM.from_pretrained(llm_dir)
    tower = model.model.vision_tower.state_dict()
    # the projector reads layer -2: the last layer and SigLIP's pooling head are never built (next test)
    unused = {name for name in vision.state_dict() if name.startswith(("encoder.layers.1.", "head."))}
    assert unused and set(tower) == set(vision.state_dict()) - unused
    for name, value in tower.items():
        assert torch.equal(value, vision.state_dict()[name])
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)
    assert model.get_input_embeddings().weight.shape[0] == len(processor.tokenizer)
    assert not any(p.is_meta for p in model.parameters())


def test_a_seeded_random_build_with_the_tower_cut_is_the_model_the_full_tower_gave():
    torch.manual_seed(0)
    full, _ = build_tiny_model_and_processor(vision_feature_layer=-1)  # reads the last layer: nothing cut
    torch.manual_seed(0)
    cut, _ = build_tiny_model_and_processor()  # reads layer -2: the last layer is cut
    assert len(full.model.vision_tower.encoder.layers) == 2 and len(cut.model.vision_tower.encoder.layers) == 1
    full_weights = full.state_dict()
    for name, value in cut.state_dict().items():
        assert torch.equal(value, full_weights[name]), name
    frames = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = full.model.vision_tower(pixel_values=frames, output_hidden_states=True).hidden_states[-2]
        assert torch.equal(cut.model.encode_frames(frames), expected)


@pytest.mark.parametrize("feature_layer", [-1, -2], ids=["whole tower", "tower cut"])
def test_a_random_build_takes_the_dtype_asked_for_in_every_part(feature_layer):
    """bf16 training builds its frozen parts in bf16: the tower of a model built from configs (tiny, bench presets)
    included, which used to stay fp32."""
    model, _ = build_tiny_model_and_processor(vision_feature_layer=feature_layer, dtype=torch.bfloat16)
    assert {name.split(".")[1] for name, _ in model.named_parameters()} >= {"vision_tower", "projector", "language_model"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_tower_layers_after_the_feature_layer_are_dropped_and_features_unchanged(tmp_path, family):
    from transformers import AutoModel

    from videollm.data.tokenizer import build_tiny_tokenizer
    from videollm.model.builder import build_model_and_processor

    torch.manual_seed(0)
    config = tiny_vision_config(family)
    config.num_hidden_layers = 4
    full = AutoModel.from_config(config).eval()
    full.save_pretrained(tmp_path / "tower")
    tokenizer = build_tiny_tokenizer()
    model, _ = build_model_and_processor(str(tmp_path / "tower"), tiny_text_config(len(tokenizer)), tokenizer=tokenizer)
    assert model.config.vision_config.num_hidden_layers == 3 and model.config.vision_feature_layer == -1
    layers = {name.split("layers.")[1].split(".")[0] for name in model.model.vision_tower.state_dict() if "layers." in name}
    assert layers == {"0", "1", "2"}
    assert not hasattr(model.model.vision_tower, "head")  # SigLIP's pooling head reads the last layer: gone too
    frames = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = full(pixel_values=frames, output_hidden_states=True).hidden_states[-2]
        features = model.model.eval().encode_frames(frames)
    assert torch.equal(features, expected[:, 1:] if family == "clip" else expected)
    # the cut is saved with the model: a reload builds the same 3-layer tower and the same features
    save_checkpoint(model, _, tmp_path / "saved")
    reloaded, _ = load_model(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(reloaded.model.eval().encode_frames(frames), features)
    # a layer index that needs every layer keeps them all
    last, _ = build_model_and_processor(config, tiny_text_config(len(tokenizer)), tokenizer=tokenizer, vision_feature_layer=-1)
    assert last.config.vision_config.num_hidden_layers == 4 and config.num_hidden_layers == 4  # the caller's config untouched


def test_lora_trains_only_adapter_and_projector_then_round_trips(pretrained_parts, tmp_path):
    from videollm.model.builder import build_model_and_processor

    vision_dir, llm_dir = pretrained_parts
    torch.manual_seed(0)
    model, processor = build_model_and_processor(str(vision_dir), str(llm_dir), projector_type="mlp")
    model = apply_trainable_policy(model, TrainablePolicy(llm="lora", lora_r=4))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and not any("vision_tower" in n for n in trainable)
    assert all("lora_" in n or "projector" in n for n in trainable)
    assert any("projector" in n for n in trainable)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, batch = mixed_batch(processor)
    model.train()
    model(**batch).loss.backward()
    # LoRA B starts at zero, so A gets no gradient on the first step; a second step moves everything
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.step()
        optimizer.zero_grad()
        model(**batch).loss.backward()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (name in trainable), name

    model.eval()
    save_checkpoint(model, processor, tmp_path / "ckpt")
    reloaded, reloaded_processor = load_model(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-6)
    merged, _ = load_model(tmp_path / "ckpt", merge=True)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, merged(**batch).logits, atol=1e-5)

    export_main(["--model", str(tmp_path / "ckpt"), "--output_dir", str(tmp_path / "merged")])
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert AutoProcessor.from_pretrained(tmp_path / "merged").spec == processor.spec
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, exported(**batch).logits, atol=1e-5)


def test_lora_on_random_llm_is_refused():
    model, _ = build_tiny_model_and_processor("mlp")
    with pytest.raises(ValueError, match="llm: lora needs pretrained frozen parts"):
        apply_trainable_policy(model, TrainablePolicy(llm="lora"))


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"vision_feature_layer": 3}, "vision_feature_layer: 3 is not a hidden state of the 2-layer vision tower; choose from -3 to 2"),
        ({"vision_feature_layer": -4}, "vision_feature_layer: -4 is not a hidden state"),
        ({"projector_type": "qformer", "num_query_tokens": 0}, "num_query_tokens: must be a positive number"),
    ],
)
def test_architecture_keys_out_of_range_are_refused_by_name(keys, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model_and_processor(**{"projector_type": "mlp", **keys})


@pytest.mark.parametrize("projector_type", PROJECTORS)
def test_projector_emits_exactly_the_layout_count(projector_type):
    model, processor = build_tiny_model_and_processor(projector_type)
    size = processor.spec.frame_size
    for num_frames in (1, 3, 5, 8):
        features = model.get_video_features(torch.randn(num_frames, 3, size, size), [num_frames])
        assert features[0].shape[0] == processor.layout.count(num_frames) == model.config.visual_token_layout().count(num_frames)


def test_frame_embeddings_make_features_depend_on_frame_order():
    frames = torch.randn(4, 3, 32, 32)
    reversed_frames = frames.flip(0)
    for enabled in (True, False):
        torch.manual_seed(0)
        model, _ = build_tiny_model_and_processor("mlp", frame_embeddings=enabled)
        with torch.no_grad():
            forward = model.get_video_features(frames, [4])[0].reshape(4, -1, 64)
            backward = model.get_video_features(reversed_frames, [4])[0].reshape(4, -1, 64)
        # without frame embeddings the projector sees each frame alone, so reversing frames only reorders tokens
        assert torch.allclose(forward, backward.flip(0), atol=1e-6) is not enabled


def test_continuing_an_adapter_trains_what_the_policy_says(saved_model, tmp_path):
    """An adapter checkpoint loaded to train on (`tune_llm: lora`) keeps training its LoRA; the projector it saved
    trains only with `tune_projector: full`, and a part the adapter does not save cannot be asked to train."""
    from videollm.train.config import DataArguments, ModelArguments
    from videollm.train.setup import load_or_build

    def load(path, projector: str):
        return load_or_build(ModelArguments(model_name_or_path=str(path), tune_llm="lora", tune_projector=projector, lora_r=4),
                             DataArguments(), seed=0)  # fmt: skip

    def trained(model) -> set[str]:
        return {"lora" if "lora_" in n else n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad}

    for projector in ("full", "frozen"):
        save_checkpoint(*load(saved_model, projector), tmp_path / projector)
    assert trained(load(tmp_path / "full", "full")[0]) == {"lora", "projector"}
    assert trained(load(tmp_path / "full", "frozen")[0]) == {"lora"}
    assert trained(load(tmp_path / "frozen", "frozen")[0]) == {"lora"}
    with pytest.raises(ValueError, match="tune_projector: full, but the adapter checkpoint"):
        load(tmp_path / "frozen", "full")


def test_architecture_keys_a_checkpoint_does_not_have_are_named_as_ignored(saved_model, caplog):
    """A checkpoint is loaded as it was built: `projector_type: qformer` on a pool checkpoint does nothing, and says so."""
    from videollm.train.config import DataArguments, ModelArguments
    from videollm.train.setup import load_or_build

    def warnings(**keys) -> list[str]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="videollm.train.setup"):
            load_or_build(ModelArguments(model_name_or_path=str(saved_model), tune_llm="full", **keys), DataArguments())
        return [r.getMessage() for r in caplog.records if "is ignored" in r.getMessage()]

    assert warnings(projector_type="qformer", num_query_tokens=16) == [
        "projector_type: qformer is ignored: the checkpoint is loaded as it was built (pool)",
        "num_query_tokens: 16 is ignored: the checkpoint is loaded as it was built (8)",
    ]
    assert warnings(projector_type="pool") == []  # what the checkpoint has
    assert warnings() == []  # defaults are not asked for


def test_a_lora_checkpoint_started_from_relative_paths_loads_from_any_directory(pretrained_parts, tmp_path, monkeypatch):
    """The frozen base a LoRA checkpoint rebuilds is recorded by absolute path, whether it is a videollm checkpoint
    (`model_name_or_path: outputs/sft_tiny`, as dpo_tiny.yaml has it) or a vision tower and an LLM."""
    from videollm.model.builder import build_model_and_processor

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    save_checkpoint(*build_tiny_model_and_processor("mlp"), "tiny")  # names no pretrained parts: only its path rebuilds it
    lora = TrainablePolicy(llm="lora", lora_r=4)
    from_parts, parts_processor = build_model_and_processor("siglip", "qwen", projector_type="mlp")
    from_checkpoint, checkpoint_processor = load_model("tiny")
    expected = {}
    for name, model, processor in (
        ("from_parts", from_parts, parts_processor),
        ("from_checkpoint", from_checkpoint, checkpoint_processor),
    ):
        adapted = apply_trainable_policy(model, lora)
        with torch.no_grad():
            next(p for n, p in adapted.named_parameters() if "lora_B" in n).fill_(0.01)  # not a no-op adapter
            batch = mixed_batch(processor)[1]
            expected[name] = (batch, adapted.eval()(**batch).logits)
        save_checkpoint(adapted, processor, name)
    monkeypatch.chdir(tmp_path.parent)
    for name, (batch, logits) in expected.items():
        with torch.no_grad():
            assert torch.allclose(load_model(tmp_path / name)[0](**batch).logits, logits, atol=1e-6), name
