"""The checkpoint layout, in one place.

A checkpoint directory always holds the processor and `config.json`, plus either
- the full model (`model.safetensors`), loadable with `AutoModelForCausalLM.from_pretrained(dir)`, or
- a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`: LoRA weights and every tuned non-LoRA part,
  such as the projector). Its frozen base is rebuilt from the pretrained sources recorded in the config
  (`vision_name_or_path` + `text_name_or_path`) or from the videollm checkpoint named in the adapter config.
`load_model(dir)` reads both kinds in one call.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from videollm.data.processor import VideoLLMProcessor
from videollm.model.configuration import VideoLLMConfig
from videollm.model.modeling import VideoLLMForConditionalGeneration
from videollm.model.trainable import unwrap

ADAPTER_CONFIG = "adapter_config.json"


def save_checkpoint(
    model: nn.Module,
    processor: VideoLLMProcessor | None,
    output_dir: str | Path,
    state_dict: dict | None = None,
    is_main_process: bool = True,
) -> None:
    """Write the model (full or adapter), its videollm config and the processor to `output_dir`.

    state_dict: the gathered weights when the live ones are sharded (DeepSpeed ZeRO-3, FSDP).
    is_main_process: False on a rank that only takes part in the collectives of a sharded save and writes nothing.
    """
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir, state_dict=state_dict, is_main_process=is_main_process)
    if not is_main_process:
        return
    config = copy.deepcopy(unwrap(model).config)
    # transformers loads every weight in the config's dtype unless told otherwise, and writes there the dtype of the
    # model's first weight. After bf16 training that is the frozen tower's bf16, and the fp32 weights that trained
    # would load rounded to bf16; the widest stored dtype loads every weight as it was saved.
    stored = widest_float_dtype(state_dict if state_dict is not None else model.state_dict())
    for part in [config, *(getattr(config, key) for key in config.sub_configs)]:
        if part is not None and stored is not None:
            part.dtype = stored
    config.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)


def widest_float_dtype(weights: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype of most bits among `weights` (None if there is none)."""
    dtypes = {tensor.dtype for tensor in weights.values() if tensor.is_floating_point()}
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).bits, default=None)


def is_adapter_checkpoint(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _load_base(path: Path, dtype: torch.dtype | None) -> VideoLLMForConditionalGeneration:
    from videollm.model.builder import _assemble, resize_vocab_deterministically

    base_path = json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if base_path and (Path(base_path) / "config.json").is_file() and not is_adapter_checkpoint(base_path):
        return VideoLLMForConditionalGeneration.from_pretrained(base_path, dtype=dtype)
    config = VideoLLMConfig.from_pretrained(path)
    if config.vision_name_or_path is None or config.text_name_or_path is None:
        raise ValueError(
            f"{path}: adapter checkpoint without a loadable base: its config names no pretrained vision tower / LLM "
            f"and base_model_name_or_path={base_path!r} is not a videollm checkpoint"
        )
    vocab_size = config.text_config.vocab_size
    model = _assemble(config, config.vision_name_or_path, config.text_name_or_path, dtype)
    resize_vocab_deterministically(model, vocab_size)
    return model


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a videollm checkpoint (missing, a file, an empty dir, a plain transformers model), or None;
    cheap, so a front end can refuse before any model or data is loaded."""
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file; a checkpoint is a directory"
    config_file = path / "config.json"
    if not config_file.is_file():
        return f"{path} is not a videollm checkpoint (no config.json)"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as error:
        return f"{config_file}: not a valid JSON config ({error})"
    if model_type != "videollm":
        return (
            f"{path} is not a videollm checkpoint (config.json has model_type {model_type!r}, not 'videollm'); "
            "the training recipes and videollm.export write one"
        )
    return None


def load_model(
    path: str | Path, dtype: torch.dtype | None = None, merge: bool = False, trainable: bool = False
) -> tuple[nn.Module, VideoLLMProcessor]:
    """Load a videollm checkpoint (full or adapter) and its processor.

    merge: fold a LoRA adapter into the weights and return a plain model (for export and fast inference).
    trainable: keep adapter weights trainable (to continue training); otherwise the model is in eval mode.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a videollm checkpoint (no config.json)")
    processor = VideoLLMProcessor.from_pretrained(path)
    if is_adapter_checkpoint(path):
        model = PeftModel.from_pretrained(_load_base(path, dtype), path, is_trainable=trainable)
        if merge:
            model = model.merge_and_unload()
    else:
        # The absolute path becomes the model's `name_or_path`, which a LoRA started from it records as its base: a
        # relative one would tie that adapter checkpoint to this working directory.
        model = VideoLLMForConditionalGeneration.from_pretrained(path.resolve(), dtype=dtype)
    if not trainable:
        model.eval()
    return model, processor


def export_merged(path: str | Path, output_dir: str | Path) -> None:
    """Write a merged, adapter-free copy of a checkpoint that the Auto classes load directly."""
    model, processor = load_model(path, merge=True)
    save_checkpoint(model, processor, output_dir)
