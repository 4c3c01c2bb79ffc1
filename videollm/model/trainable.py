"""Which parts of a video LLM train: the vision tower, the projector and the LLM, each on its own switch.

LoRA goes on the LLM's linear layers only (SigLIP/CLIP share the names q_proj/k_proj/..., so a plain name list would
also hit the vision tower); tuned non-LoRA parts ride along as PEFT `modules_to_save`, so an adapter checkpoint holds
everything that changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper
from torch import nn

from videollm.model.modeling import VideoLLMForConditionalGeneration

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# How each part may train (the recipes' keys are tune_<part>, with the tower named `vision`).
PART_SETTINGS = {"vision": ("frozen", "full"), "projector": ("full", "frozen"), "llm": ("lora", "full", "frozen")}


@dataclass
class TrainablePolicy:
    """What trains. `llm="lora"` keeps the LLM frozen under a LoRA adapter; `full` trains all of it."""

    vision: Literal["frozen", "full"] = field(default="frozen", metadata={"help": "vision tower: frozen | full"})
    projector: Literal["full", "frozen"] = field(default="full", metadata={"help": "projector: full | frozen"})
    llm: Literal["lora", "full", "frozen"] = field(default="lora", metadata={"help": "LLM: lora | full | frozen"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS), metadata={"help": "LLM linear layers that get LoRA"}
    )

    def __post_init__(self) -> None:
        for name, allowed in PART_SETTINGS.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not one of {' | '.join(allowed)}")
        if self.llm == "lora" and self.lora_r < 1:
            raise ValueError(f"lora_r: must be >= 1, got {self.lora_r}")

    def lora_config(self) -> LoraConfig:
        modules_to_save = [name for name, part in (("projector", self.projector), ("vision_tower", self.vision)) if part == "full"]
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=rf".*\.language_model\..*\.({'|'.join(self.lora_target_modules)})",
            modules_to_save=modules_to_save or None,
            task_type="CAUSAL_LM",
        )


def apply_trainable_policy(model: VideoLLMForConditionalGeneration, policy: TrainablePolicy) -> nn.Module:
    """Set requires_grad per part; with `llm="lora"` return the PEFT-wrapped model.

    A LoRA checkpoint stores only what trains, so every frozen part must be rebuildable from a pretrained source:
    a randomly initialised frozen part is refused here rather than silently lost at save time.
    """
    if policy.llm == "lora":
        unnamed = []
        if model.config.text_name_or_path is None and not model.name_or_path:
            unnamed.append("the LLM (text config without a checkpoint)")
        if policy.vision == "frozen" and model.config.vision_name_or_path is None and not model.name_or_path:
            unnamed.append("the frozen vision tower (vision config without a checkpoint)")
        if unnamed:
            raise ValueError(
                f"llm: lora needs pretrained frozen parts, but {' and '.join(unnamed)} would be random weights that an "
                "adapter checkpoint cannot restore; start from checkpoints (model_name_or_path, or vision/llm names) "
                "or train randomly initialised parts with llm: full / vision: full"
            )
    model.model.vision_tower.requires_grad_(policy.vision == "full")
    model.model.projector.requires_grad_(policy.projector == "full")
    llm_trains = policy.llm == "full"
    model.model.language_model.requires_grad_(llm_trains)
    model.lm_head.requires_grad_(llm_trains)
    if policy.llm != "lora":
        return model
    return get_peft_model(model, policy.lora_config())


def apply_policy_to_adapter(model: PeftModel, policy: TrainablePolicy) -> PeftModel:
    """Set what trains in a loaded adapter checkpoint that training continues: its LoRA, plus the vision tower and
    projector as `policy` says (`PeftModel.from_pretrained(is_trainable=True)` trains every part the adapter saved).

    A part the policy trains must be one the adapter saves (`modules_to_save`); outside it, its changes would be lost
    at save time, so that is refused, naming the config key. The LoRA settings are the adapter's own.
    """
    adapter = model.active_adapter
    saved = set(model.peft_config[adapter].modules_to_save or [])
    base = unwrap(model).model
    for part, key, setting in (("vision_tower", "tune_vision", policy.vision), ("projector", "tune_projector", policy.projector)):
        trains = setting == "full"
        if trains and part not in saved:
            raise ValueError(
                f"{key}: full, but the adapter checkpoint being continued does not save the {part} (its "
                f"modules_to_save: {sorted(saved)}), so its training would be lost; set {key}: frozen, or merge the "
                "adapter (python -m videollm.export --model DIR --output_dir MERGED) and start a new one from MERGED"
            )
        module = getattr(base, part)
        if isinstance(module, ModulesToSaveWrapper):
            module.modules_to_save[adapter].requires_grad_(trains)
    return model


def unwrap(model: nn.Module) -> VideoLLMForConditionalGeneration:
    """The VideoLLM under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    decay_names: set[str],
    projector_lr: float | None = None,
    vision_lr: float | None = None,
) -> list[dict]:
    """Optimizer parameter groups with a learning rate per part (LLaVA's `mm_projector_lr` / `mm_vision_tower_lr`).

    A projector or vision tower trained as fast as a small LLM can lose what its random or pretrained features knew:
    on the synthetic task, mixing colour and shape questions with motion questions at one rate turned the projector
    into a colour/shape encoder and motion stayed at chance, while a 10x lower projector rate learnt all three.
    Frame-index embeddings are new parameters that carry time; they train at the main rate. `decay_names` are the parameter names that take weight decay (the Trainer's `get_decay_parameter_names`).
    """
    rates = {"projector": projector_lr, "vision_tower": vision_lr}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = next((p for p in rates if f".{p}." in f".{name}." and "frame_embedding" not in name), None)
        rate = rates[part] if part is not None and rates[part] is not None else learning_rate
        decay = weight_decay if name in decay_names else 0.0
        groups.setdefault((rate, decay), []).append(parameter)
    return [{"params": params, "lr": rate, "weight_decay": decay} for (rate, decay), params in groups.items()]
