"""Learning rates per model part, for every trainer (SFT and DPO): the projector and the vision tower may train slower
than the LLM, as LLaVA's `mm_projector_lr` / `mm_vision_tower_lr` allow. Neither the HF Trainer nor TRL has per-part
rates, hence this mixin; the grouping itself lives with the parts in `videollm.model.trainable.parameter_groups`."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from videollm.model.trainable import parameter_groups


@dataclass
class PartLearningRateArguments:
    """Config keys shared by the SFT and DPO configs (unset: the part trains at `learning_rate`)."""

    projector_lr: float | None = field(
        default=None,
        metadata={"help": "learning rate of the projector (frame-index embeddings excepted); default: learning_rate"},
    )
    vision_lr: float | None = field(
        default=None, metadata={"help": "learning rate of the vision tower when it trains; default: learning_rate"}
    )


class PartLearningRateMixin:
    """Builds the optimizer with one group per (part rate, weight decay) when a part rate is set."""

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        projector_lr = getattr(self.args, "projector_lr", None)
        vision_lr = getattr(self.args, "vision_lr", None)
        if self.optimizer is None and (projector_lr is not None or vision_lr is not None):
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = parameter_groups(
                opt_model,
                self.args.learning_rate,
                self.args.weight_decay,
                set(self.get_decay_parameter_names(opt_model)),
                projector_lr=projector_lr,
                vision_lr=vision_lr,
            )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)
