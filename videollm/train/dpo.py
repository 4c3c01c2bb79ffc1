"""Direct preference optimisation of video LLMs on TRL's DPOTrainer.

TRL knows no video. `VideoDPOTrainer` subclasses its DPOTrainer at the documented hooks and adds only what video
needs; every TRL loss type (and weighted mixes such as `[sigmoid, sft]`), the metrics and the logging stay TRL's.

- Data: preference records (`load_preferences`) become a `datasets.Dataset` of prompt/chosen/rejected/video paths;
  `PreferenceCollator` decodes each video ONCE and encodes chosen and rejected with the model's processor.
- Encode once (`compute_loss`): the frames of a batch go through the vision tower and projector once; the result
  (`video_embeds`) is shared by the chosen and the rejected rows and, when the vision tower and projector are frozen,
  by the policy and the reference.
- Reference: with LoRA it is the policy with the adapter disabled (no second copy of the weights). Its log-probs always
  reach TRL's loss through the batch: computed on the fly from the shared encoding, or precomputed once and cached
  (`precompute_ref_log_probs: true`), which TRL refuses for vision data and we support.
- RRPO (`loss_type: [rrpo]`, optionally `[rrpo, sft]`): phrase-level rewards and a token-wise KL; see `losses.py`.
- Rounds (`rounds: N` or `round_train_files`): multi-round DPO (mrDPO) and TEMPLE-style curricula. After each round
  the LoRA is merged into the base, which becomes the next round's reference, and a fresh LoRA starts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from datasets.fingerprint import Hasher
from peft import LoraConfig
from peft.utils import ModulesToSaveWrapper
from torch import nn
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from videollm.data.dataset import SAMPLE_IDS
from videollm.data.feature_cache import FeatureCache
from videollm.data.formats import DataValidationError, PreferenceRecord
from videollm.data.processor import IGNORE_INDEX, VideoLLMProcessor, concat_video_tensors
from videollm.data.robust import BadSampleCollator, BadSamplePolicy
from videollm.data.video import DecodedVideo
from videollm.model.checkpoint import save_checkpoint
from videollm.model.modeling import VideoLLMForConditionalGeneration
from videollm.model.trainable import TrainablePolicy, apply_trainable_policy, unwrap
from videollm.train.checkpointing import CheckpointMixin
from videollm.train.data_wait import DataWaitMixin
from videollm.train.guards import DEFAULT_MAX_NONFINITE_STEPS, MAX_NONFINITE_STEPS_HELP, NonFiniteGuardMixin
from videollm.train.hardware import DeviceDefaultsArguments, upcast_trainable_parameters
from videollm.train.losses import NO_PHRASE, gather_logprobs, phrase_rewards, rrpo_loss, sft_loss, token_kl
from videollm.train.optim import PartLearningRateArguments, PartLearningRateMixin

logger = logging.getLogger(__name__)

# TRL 1.16 computes these inline in DPOTrainer._compute_loss; listed here only to reject typos before training starts.
TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
VIDEO_LOSS_TYPES = ("rrpo",)
PREFERENCE_COLUMNS = ["id", "prompt", "chosen", "rejected", "videos", "chosen_phrases", "rejected_phrases"]
REF_COLUMNS = ["ref_chosen_logps", "ref_rejected_logps"]


@dataclass
class VideoDPOConfig(DeviceDefaultsArguments, PartLearningRateArguments, DPOConfig):
    """TRL's DPOConfig plus RRPO and multi-round options; bf16 and gradient checkpointing default as in SFT
    (`videollm.train.hardware`), not TRL's always-on.

    `max_length` is not a key here: the data keys own it (`DataArguments.max_length`), and the processor applies it
    without ever cutting visual tokens.
    """

    max_length: int | None = field(default=None, init=False, metadata={"help": "set by the data keys' max_length"})
    rrpo_alpha: float = field(
        default=0.01, metadata={"help": "rrpo: weight of the token-wise KL(p_ref || p_theta) over the chosen answer"}
    )
    rounds: int = field(
        default=1,
        metadata={"help": "DPO rounds (mrDPO): after each, the LoRA is merged and becomes the next round's reference"},
    )
    round_train_files: list[str] | None = field(
        default=None,
        metadata={"help": "one preference file per round, in order (a curriculum, e.g. coarse to fine perturbations)"},
    )
    max_nonfinite_steps: int = field(default=DEFAULT_MAX_NONFINITE_STEPS, metadata={"help": MAX_NONFINITE_STEPS_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        known = TRL_LOSS_TYPES + VIDEO_LOSS_TYPES
        unknown = [t for t in self.loss_type if t not in known]
        if unknown:
            raise ValueError(f"loss_type: {unknown} unknown; choose from {', '.join(known)}")
        if "rrpo" in self.loss_type:
            others = set(self.loss_type) - {"rrpo", "sft"}
            if others:
                raise ValueError(f"loss_type: rrpo combines only with sft, got {self.loss_type}")
            if self.precompute_ref_log_probs:
                raise ValueError(
                    "loss_type: rrpo needs per-token reference distributions (token-wise KL); "
                    "set precompute_ref_log_probs: false"
                )
            if self.use_weighting or self.ld_alpha is not None or self.f_divergence_type != "reverse_kl":
                raise ValueError("loss_type: rrpo does not support use_weighting, ld_alpha or f_divergence_type")
        if self.rounds < 1:
            raise ValueError(f"rounds: must be >= 1, got {self.rounds}")
        if self.round_train_files is not None:
            if self.rounds not in (1, len(self.round_train_files)):
                raise ValueError(
                    f"rounds: {self.rounds} but round_train_files lists {len(self.round_train_files)} files; "
                    "give one file per round"
                )
            self.rounds = len(self.round_train_files)
            missing = [f for f in self.round_train_files if not Path(f).is_file()]
            if missing:
                raise ValueError(f"round_train_files: {missing} do not exist")


# ---- data ------------------------------------------------------------------------------------------------------------


def preference_rows(records: Sequence[PreferenceRecord]) -> list[dict[str, Any]]:
    """Records as dataset rows; every marked phrase must occur in its answer (in order), or DataValidationError."""
    rows, problems = [], []
    for record in records:
        row = {
            "id": record.id,
            "prompt": [{"role": m.role, "content": m.content} for m in record.prompt],
            "chosen": record.chosen,
            "rejected": record.rejected,
            "videos": list(record.videos),
        }
        for side in ("chosen", "rejected"):
            phrases = [str(p) for p in record.meta.get(f"{side}_phrases") or []]
            if _phrase_spans(row[side], phrases) is None:
                problem = f"{phrases} do not all occur, in order, in {side} {row[side]!r}"
                problems.append(f"{record.source}: {side}_phrases: {problem}")
            row[f"{side}_phrases"] = phrases
        rows.append(row)
    if problems:
        raise DataValidationError(problems)
    return rows


def build_preference_dataset(
    rows: Sequence[dict[str, Any]], processor: VideoLLMProcessor, cache_dir: str | None = None
) -> Dataset:
    """An on-disk `datasets.Dataset` of preference rows (the form DPOTrainer takes).

    Written to the datasets cache so that precomputed reference log-probs are cached next to it, under a fingerprint
    of the rows, the video files (size, mtime) and the processor settings that change what the model sees.
    """
    videos = sorted({path for row in rows for path in row["videos"]})
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) if os.path.exists(p) else (p, None, None) for p in videos]
    seen = {
        "sampling": processor.sampling,
        "token_layout": processor.token_layout,
        "timestamps_in_prompt": processor.timestamps_in_prompt,
        "max_length": processor.max_length,
        "chat_template": processor.chat_template,
        "image_mean_std": (processor.image_mean, processor.image_std),
    }
    fingerprint = Hasher.hash({"rows": list(rows), "videos": stats, "processor": seen})
    return Dataset.from_generator(
        _yield_rows, gen_kwargs={"rows": list(rows)}, cache_dir=cache_dir, fingerprint=fingerprint
    )


def _yield_rows(rows):
    yield from rows


def _phrase_spans(text: str, phrases: Sequence[str]) -> list[tuple[int, int]] | None:
    """Character spans of each phrase, searched left to right; None if one is missing."""
    spans, cursor = [], 0
    for phrase in phrases:
        start = text.find(phrase, cursor)
        if not phrase or start < 0:
            return None
        spans.append((start, start + len(phrase)))
        cursor = start + len(phrase)
    return spans


class PreferenceCollator:
    """Preference rows -> one batch: rows `[chosen_0..chosen_B-1, rejected_0..rejected_B-1]` (TRL's layout).

    `videos` holds paths (read with `load_video`: by default decoded with the processor's sampling spec; a
    `FeatureCache`'s `get` reads cached features instead) or already read `DecodedVideo`s. Each video is read once and
    appears once (`pixel_values_videos`, or `video_frame_features` / `video_embeds` from a feature cache, with
    `video_num_frames`); the trainer encodes it once and reuses the result for both halves. `sample_ids` lists the
    pairs' ids (for the non-finite guard's reports; the model never sees them). With `mark_phrases`, `phrase_ids` gives
    each answer token its RRPO phrase index (-1 outside); a pair without marked phrases counts each whole answer as one
    phrase.
    """

    def __init__(
        self,
        processor: VideoLLMProcessor,
        mark_phrases: bool = False,
        load_video: Callable[[str], DecodedVideo] | None = None,
    ):
        self.processor = processor
        self.mark_phrases = mark_phrases
        self.load_video = load_video or processor.load_video

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        chosen, rejected, video_tensors = [], [], []
        for example in examples:
            videos = [v if isinstance(v, DecodedVideo) else self.load_video(v) for v in example["videos"]]
            prompt = [dict(m) for m in example["prompt"]]
            for side, out in (("chosen", chosen), ("rejected", rejected)):
                messages = prompt + [{"role": "assistant", "content": example[side]}]
                sample_id = str(example.get("id", ""))
                # The pair's video inputs come from the chosen encoding; the rejected one only needs the tokens.
                out.append(self.processor.encode(messages, videos, sample_id=sample_id, with_video_inputs=side == "chosen"))
            video_tensors.append(chosen[-1].as_features())
        rows = chosen + rejected
        batch = self.processor.collate([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        concat_video_tensors(video_tensors, batch)
        batch[SAMPLE_IDS] = [str(example.get("id", "")) for example in examples]
        if self.mark_phrases:
            batch["phrase_ids"] = self._phrase_ids(examples, rows, batch["input_ids"].shape[1])
        for key in REF_COLUMNS:
            if examples[0].get(key) is not None:
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.float32)
        return batch

    def _phrase_ids(self, examples: Sequence[dict[str, Any]], rows: list, length: int) -> torch.Tensor:
        phrase_ids = torch.full((len(rows), length), NO_PHRASE, dtype=torch.long)
        half = len(examples)
        for row, encoded in enumerate(rows):
            example, side = examples[row % half], "chosen" if row < half else "rejected"
            positions = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
            marked = bool(example["chosen_phrases"] or example["rejected_phrases"])
            if not marked:
                phrase_ids[row, positions] = 0
                continue
            ids = self._token_phrases([encoded.input_ids[i] for i in positions], example[f"{side}_phrases"])
            if ids is None:
                logger.warning("pair %s: marked phrases not found after tokenisation; whole answers used", example.get("id"))
                ids = [0] * len(positions)
            phrase_ids[row, positions] = torch.tensor(ids, dtype=torch.long)
        return phrase_ids

    def _token_phrases(self, completion_ids: list[int], phrases: Sequence[str]) -> list[int] | None:
        """Phrase index of each completion token, from the character span each token decodes to."""
        tokenizer = self.processor.tokenizer
        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, clean_up_tokenization_spaces=False)

        ends = [len(decode(completion_ids[: k + 1])) for k in range(len(completion_ids))]
        text = decode(completion_ids)
        spans = _phrase_spans(text, phrases)
        if spans is None:
            return None
        ids = []
        for k, end in enumerate(ends):
            start = ends[k - 1] if k else 0
            hit = [p for p, (s, e) in enumerate(spans) if start < e and end > s]
            ids.append(hit[0] if hit else NO_PHRASE)
        return ids


def is_untrained_adapter(model: nn.Module) -> bool:
    """True for a model under one LoRA adapter that does not change it yet (all lora_B zero, saved modules unchanged)."""
    if not is_peft_model(model) or list(model.peft_config) != ["default"]:
        return False
    if not isinstance(model.peft_config["default"], LoraConfig):
        return False
    for name, param in model.named_parameters():
        if "lora_B" in name and bool(param.detach().any()):
            return False
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            original, copied = module.original_module.state_dict(), module.modules_to_save["default"].state_dict()
            if any(not torch.equal(original[key], copied[key]) for key in original):
                return False
    return True


# ---- trainer ---------------------------------------------------------------------------------------------------------


class VideoDPOTrainer(CheckpointMixin, NonFiniteGuardMixin, DataWaitMixin, PartLearningRateMixin, DPOTrainer):
    """TRL's DPOTrainer for `VideoLLMForConditionalGeneration`: encode each video once, share it, keep TRL's losses.

    Checkpoints are videollm checkpoints, written atomically (`CheckpointMixin`); non-finite steps are skipped and
    counted (`NonFiniteGuardMixin`); the logs carry the share of time spent waiting for data (`DataWaitMixin`).

    Takes the same arguments as `DPOTrainer`; `processing_class` must be the model's `VideoLLMProcessor` and the
    datasets come from `build_preference_dataset`. A model without LoRA and without precomputed reference log-probs
    gets a frozen copy as its reference (the one case that needs one).
    """

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, args: VideoDPOConfig | None = None, **kwargs):
        processor = kwargs.get("processing_class")
        if not isinstance(processor, VideoLLMProcessor):
            raise TypeError("VideoDPOTrainer needs processing_class=<the model's VideoLLMProcessor>")
        args = args or VideoDPOConfig(output_dir="dpo")
        self.uses_rrpo = "rrpo" in args.loss_type
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = PreferenceCollator(processor, mark_phrases=self.uses_rrpo)
        if ref_model is None and kwargs.get("peft_config") is None and is_untrained_adapter(model):
            # TRL copies any adapter it is handed into a "ref" adapter, as it cannot know the adapter is untrained. An
            # untrained LoRA adds nothing to the base, so TRL gets the base and the adapter's config instead: it
            # re-creates the adapter, and the reference is the base with the adapter disabled, a copy of nothing.
            kwargs["peft_config"] = copy.deepcopy(model.peft_config["default"])
            model = model.unload()
        lora = is_peft_model(model) or kwargs.get("peft_config") is not None
        if ref_model is None and not lora and not args.precompute_ref_log_probs:
            logger.warning("full fine-tuning: the reference is a frozen copy of the weights (LoRA or precompute_ref_log_probs avoid it)")
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        # TRL's loss takes the reference log-probs from the batch when this is set. We always put them there: cached by
        # precompute_ref_log_probs, or computed in compute_loss from the shared video encoding.
        self.precompute_ref_logps = True

    # -- TRL hooks: data ---------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        # Tokenisation needs the decoded video (its frame count sets the number of visual tokens), so it happens in
        # the collator, as TRL does for images.
        missing = [c for c in ("prompt", "chosen", "rejected", "videos") if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{dataset_name} dataset: missing columns {missing}; build it with build_preference_dataset")
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = PREFERENCE_COLUMNS + REF_COLUMNS

    # -- video encoding, shared ---------------------------------------------------------------------------------------
    def _reference_model(self) -> nn.Module:
        return self.ref_model if self.ref_model is not None else self.model

    def _reference_context(self):
        """The policy with its adapter disabled (or TRL's copied "ref" adapter) acts as the reference."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _frozen(self, part: str) -> bool:
        base = unwrap(self.accelerator.unwrap_model(self.model))
        return not any(p.requires_grad for p in getattr(base.model, part).parameters())

    def _video_embeds(self, inputs: dict[str, Any], for_policy: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Pop the frames from `inputs`; return (policy, reference) projector outputs, each video encoded once.

        A frozen vision tower and projector are the same in the policy and the reference, so one no-grad encoding
        serves both. A trained projector differs from the reference's: the frozen tower still runs once, and its
        features are projected twice. Features read from a feature cache skip what they replace: tower features skip
        the tower, projector outputs skip both.

        A batch without video encodes one blank frame the same way and returns zero visual tokens that stay attached
        to the graph: every rank then runs the same vision modules in the same order, as ZeRO-3/FSDP need (they gather
        weights collectively in each module's forward), and every trained vision weight gets a (zero) gradient, as
        DDP needs. The model's own blank-frame pass (`VideoLLMModel._needs_dummy_video`) does not fire then: its
        forwards receive `video_embeds` on every rank.
        """
        pixel_values = inputs.pop("pixel_values_videos", None)
        frame_features = inputs.pop("video_frame_features", None)
        cached_embeds = inputs.pop("video_embeds", None)
        num_frames = inputs.pop("video_num_frames", None)
        policy_model = self.accelerator.unwrap_model(self.model)
        text_only = pixel_values is None and frame_features is None and cached_embeds is None
        if text_only:
            base = unwrap(policy_model)
            blank = base.model.blank_frame(inputs["input_ids"].new_zeros((), dtype=torch.float32))
            pixel_values, frame_features, num_frames = blank.get("pixel_values_videos"), blank.get("video_frame_features"), [1]
            if not blank:  # a projector-level feature cache: no vision module runs, no visual tokens
                cached_embeds = inputs["input_ids"].new_zeros((0, base.config.text_config.hidden_size), dtype=torch.float32)
        if cached_embeds is not None:
            # Projector-level cache: the tower and projector are frozen, the same in the policy and the reference.
            return (cached_embeds if for_policy else None), cached_embeds
        vision_frozen, projector_frozen = self._frozen("vision_tower"), self._frozen("projector")
        if frame_features is None and vision_frozen:
            with torch.no_grad():
                frame_features = policy_model.encode_frames(pixel_values)
        policy = None
        if for_policy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not (vision_frozen and projector_frozen)):
                policy = torch.cat(policy_model.get_video_features(pixel_values, num_frames, frame_features))
            if vision_frozen and projector_frozen:
                return (policy[:0], policy[:0]) if text_only else (policy, policy)
        reference_model = self.accelerator.unwrap_model(self._reference_model())
        with torch.no_grad(), self._reference_context():
            reference = torch.cat(reference_model.get_video_features(pixel_values, num_frames, frame_features))
        if text_only:
            # No rows take visual tokens; `0 * sum` keeps the blank frame's path in the backward.
            policy = None if policy is None else policy[:0] + 0.0 * policy.sum()
            reference = reference[:0]
        return policy, reference

    @staticmethod
    def _both_halves(embeds: torch.Tensor | None) -> dict[str, torch.Tensor]:
        # Rows are [chosen..., rejected...] with the same videos in the same order: the visual tokens repeat.
        return {} if embeds is None else {"video_embeds": torch.cat([embeds, embeds])}

    def compute_ref_log_probs(self, model, inputs):
        """Reference sequence log-probs of one batch (TRL calls this to precompute them), each video encoded once."""
        inputs = {k: v for k, v in inputs.items() if k not in ("phrase_ids", SAMPLE_IDS)}
        _, reference = self._video_embeds(inputs, for_policy=False)
        return super().compute_ref_log_probs(model, {**inputs, **self._both_halves(reference)})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        phrase_ids = inputs.pop("phrase_ids", None)
        inputs.pop(SAMPLE_IDS, None)
        policy, reference = self._video_embeds(inputs, for_policy=True)
        if self.uses_rrpo:
            return self._rrpo_loss(model, inputs, policy, reference, phrase_ids, return_outputs)
        if "ref_chosen_logps" not in inputs:
            ref_inputs = {**inputs, **self._both_halves(reference)}
            inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = super().compute_ref_log_probs(
                self._reference_model(), ref_inputs
            )
        inputs.update(self._both_halves(policy))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    # -- RRPO -----------------------------------------------------------------------------------------------------------
    def _rrpo_loss(self, model, inputs, policy_embeds, reference_embeds, phrase_ids, return_outputs):
        # TRL's fused LM head returns only the label log-probs; the token-wise KL needs full distributions, so the
        # logits are computed here, for the answer positions only (`logits_to_keep`).
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)[:, 1:]
        scored = (labels != IGNORE_INDEX).any(0).nonzero().flatten()
        window = torch.arange(int(scored.min()), int(scored.max()) + 1, device=labels.device)
        labels = labels[:, window]
        mask = labels != IGNORE_INDEX
        if phrase_ids is None:  # a collator that marks no phrases: each whole answer is one phrase
            phrases = torch.where(mask, 0, NO_PHRASE)
        else:
            phrases = phrase_ids[:, 1:][:, window].masked_fill(~mask, NO_PHRASE)
        model_kwargs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}

        outputs = model(**model_kwargs, **self._both_halves(policy_embeds), logits_to_keep=window)
        policy_logprobs, policy_logps = gather_logprobs(outputs.logits, labels)
        with torch.no_grad(), self._reference_context():
            reference = self._reference_model()
            ref_logits = reference(**model_kwargs, **self._both_halves(reference_embeds), logits_to_keep=window).logits
        ref_logprobs, ref_logps = gather_logprobs(ref_logits, labels)

        n = labels.shape[0] // 2
        logratios = policy_logps - ref_logps
        chosen_rewards = phrase_rewards(logratios[:n], phrases[:n], self.beta)
        rejected_rewards = phrase_rewards(logratios[n:], phrases[n:], self.beta)
        chosen_kl = token_kl(ref_logprobs[:n], policy_logprobs[:n], mask[:n])
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "rrpo":
                loss = loss + weight * rrpo_loss(chosen_rewards, rejected_rewards, chosen_kl, self.args.rrpo_alpha).mean()
            else:  # "sft", the only other type VideoDPOConfig lets through
                loss = loss + weight * sft_loss(policy_logps[:n], mask[:n])

        chosen_reward, rejected_reward = chosen_rewards.detach().sum(-1), rejected_rewards.detach().sum(-1)
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_reward).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_reward).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_reward > rejected_reward).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_reward - rejected_reward).mean().item())
        metrics["logps/chosen"].append(gather(policy_logps[:n].detach().sum(-1)).mean().item())
        metrics["logps/rejected"].append(gather(policy_logps[n:].detach().sum(-1)).mean().item())
        metrics["kl/chosen"].append(gather(chosen_kl.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss


# ---- rounds (mrDPO, curricula) ---------------------------------------------------------------------------------------


def train_dpo(
    model: nn.Module,
    processor: VideoLLMProcessor,
    train_sets: Sequence[Dataset],
    eval_set: Dataset | None,
    args: VideoDPOConfig,
    policy: TrainablePolicy,
    bad_samples: BadSamplePolicy | None = None,
    feature_cache_dir: str | os.PathLike[str] | None = None,
    video_root: str | os.PathLike[str] | None = None,
) -> VideoDPOTrainer:
    """Train one DPO round per training set and save the final model in `args.output_dir`; return the last trainer.

    With several rounds, round k trains in `output_dir/round_k`; its LoRA is merged into the base and saved as a full
    checkpoint in `output_dir/round_k/merged`, which is the base and the reference of round k + 1, under a fresh LoRA
    (mrDPO). A round whose merged checkpoint exists is skipped, so an interrupted run restarts where it stopped;
    `resume_from_checkpoint` applies to the first round that has not finished. With `bad_samples`, a pair whose video
    cannot be decoded is handled by that policy (replaced and quarantined, or a clear error; see `videollm.data.robust`).

    With `feature_cache_dir` (`data_tools/cache_features.py --recipe dpo`), videos are read as cached frozen-tower (or
    tower + projector) features instead of being decoded and encoded; every round checks that the cache matches its
    model and holds every video of the run, or raises `FeatureCacheError`.
    """
    if len(train_sets) > 1 and policy.llm != "lora":
        raise ValueError("rounds > 1 merge a LoRA after each round; set tune_llm: lora")
    resume = args.resume_from_checkpoint
    trainer = None
    collators: dict[int, PreferenceCollator | BadSampleCollator] = {}
    setup = _RoundSetup.of(model)
    for index, train_set in enumerate(train_sets, start=1):
        last = index == len(train_sets)
        round_args = args
        if len(train_sets) > 1:
            round_args = dataclasses.replace(args, output_dir=str(Path(args.output_dir) / f"round_{index}"))
        merged_dir = Path(round_args.output_dir) / "merged"
        if not last and (merged_dir / "config.json").is_file():
            logger.info("round %d already finished (%s); skipped", index, merged_dir)
            model = _fresh_lora(merged_dir, policy, setup)
            continue
        load_video = processor.load_video
        if feature_cache_dir is not None:
            # Opened again each round: the round's model must still match the cache (its frozen parts do not change).
            cache = FeatureCache.open(feature_cache_dir, model, processor, video_root=video_root)
            cache.check(path for dataset in (*train_sets, eval_set) if dataset for paths in dataset["videos"] for path in paths)
            unwrap(model).use_cached_vision(cache.level)
            load_video = cache.get
        if id(train_set) not in collators:
            # One collator per distinct dataset, so that rounds over the same file share its bad-sample counts.
            collator = PreferenceCollator(processor, mark_phrases="rrpo" in args.loss_type, load_video=load_video)
            if bad_samples is not None:
                collator = BadSampleCollator(collator, load_video, {"train": train_set, "eval": eval_set}, bad_samples)
            collators[id(train_set)] = collator
        collator = collators[id(train_set)]
        trainer = VideoDPOTrainer(
            model=model,
            args=round_args,
            train_dataset=train_set,
            eval_dataset=eval_set,
            processing_class=processor,
            data_collator=collator,
        )
        trainer.train(resume_from_checkpoint=resume)
        resume = None
        trainer.save_model(round_args.output_dir)
        trainer.save_state()
        if last:
            if len(train_sets) > 1:
                trainer.save_model(args.output_dir)
            break
        if trainer.args.should_save:  # the rank(s) that write this node's disk (see `save_on_each_node`)
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            save_checkpoint(merged, processor, merged_dir)
        trainer.accelerator.wait_for_everyone()
        trainer = model = merged = None  # this round's weights (the merged model too) go before the next round's load
        gc.collect()
        model = _fresh_lora(merged_dir, policy, setup)
    return trainer


@dataclass(frozen=True)
class _RoundSetup:
    """How the first round's model was stored and attends, for the models of later rounds: a merged checkpoint loads in
    its widest stored dtype and the default attention, so a bf16 run on a GPU would otherwise hold its frozen weights
    in fp32 (twice the memory) and leave flash-attention from round 2 on."""

    frozen_dtype: torch.dtype
    trained_dtype: torch.dtype
    attention: dict[str, str]

    @classmethod
    def of(cls, model: nn.Module) -> _RoundSetup:
        frozen = [p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
        trained = [p.dtype for p in model.parameters() if p.requires_grad]
        config = unwrap(model).config
        attention = {name: getattr(config, name)._attn_implementation for name in ("vision_config", "text_config")}
        return cls(frozen[0] if frozen else torch.float32, trained[0] if trained else torch.float32, attention)


def _fresh_lora(merged_dir: Path, policy: TrainablePolicy, setup: _RoundSetup) -> nn.Module:
    """The merged model of the last round under a new LoRA, stored and attending as the first round's model; its path
    is recorded as the adapter's base."""
    base = VideoLLMForConditionalGeneration.from_pretrained(str(merged_dir.resolve()), dtype=setup.frozen_dtype)
    base.set_attn_implementation(setup.attention)
    model = apply_trainable_policy(base, policy)
    if setup.trained_dtype == torch.float32:
        upcast_trainable_parameters(model)
    return model
