"""Preference losses that TRL does not have, as pure tensor functions (hand-checkable in tests).

TRL's DPOTrainer computes its 15 loss types inline from sequence log-probs; `VideoDPOTrainer` reuses them as they
are. What lives here is what needs token-level information TRL never computes:

- RRPO (Refined Regularized Preference Optimization): rewards summed per marked phrase instead of per answer, plus a
  token-wise KL(p_ref || p_theta) over the chosen answer that keeps the policy close to the reference.
- the SFT (negative log-likelihood) term on the chosen answer, with TRL's normalisation, so that RRPO can be combined
  with it as `loss_type: [rrpo, sft]`.

Shapes: B pairs, T completion positions (already shifted: position t scores token t + 1), V vocabulary, P phrases.
Per-token tensors are zero where the mask is zero; phrase ids are -1 outside every phrase.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NO_PHRASE = -1


def phrase_rewards(per_token_logratios: torch.Tensor, phrase_ids: torch.Tensor, beta: float) -> torch.Tensor:
    """Phrase-level rewards r_i = beta * sum over the tokens of phrase i of (log p_theta - log p_ref).

    Args:
        per_token_logratios: (B, T) log p_theta(token) - log p_ref(token).
        phrase_ids: (B, T) long, the phrase index of each token, `NO_PHRASE` (-1) for tokens outside every phrase.
        beta: the DPO temperature.

    Returns:
        (B, P) rewards, P = max phrase id + 1 (at least 1); a row with fewer phrases has zeros for the missing ones.
    """
    num_phrases = max(int(phrase_ids.max().item()) + 1, 1) if phrase_ids.numel() else 1
    in_phrase = phrase_ids >= 0
    index = phrase_ids.clamp(min=0)
    rewards = per_token_logratios.new_zeros(per_token_logratios.shape[0], num_phrases)
    rewards = rewards.scatter_add(1, index, per_token_logratios * in_phrase)
    return beta * rewards


def token_kl(ref_logprobs: torch.Tensor, policy_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of KL(p_ref || p_theta) = sum_v p_ref(v) (log p_ref(v) - log p_theta(v)).

    Args:
        ref_logprobs, policy_logprobs: (B, T, V) log-softmax over the vocabulary at each position.
        mask: (B, T) 1 where the position counts (the chosen answer's tokens).

    Returns:
        (B,) summed KL per sequence.
    """
    kl = F.kl_div(policy_logprobs, ref_logprobs, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum(-1)


def rrpo_loss(
    chosen_phrase_rewards: torch.Tensor,
    rejected_phrase_rewards: torch.Tensor,
    chosen_kl: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """RRPO per pair: -log sigmoid(sum_i r_i(y+) - sum_j r_j(y-)) + alpha * sum over y+ tokens of KL(p_ref || p_theta).

    Args:
        chosen_phrase_rewards, rejected_phrase_rewards: (B, P+) and (B, P-) from `phrase_rewards`.
        chosen_kl: (B,) from `token_kl` over the chosen answer.
        alpha: weight of the KL term (0.01 in the paper).

    Returns:
        (B,) loss per pair. With one phrase covering each whole answer and alpha = 0 this is sigmoid DPO.
    """
    margin = chosen_phrase_rewards.sum(-1) - rejected_phrase_rewards.sum(-1)
    return -F.logsigmoid(margin) + alpha * chosen_kl


def sft_loss(chosen_per_token_logps: torch.Tensor, chosen_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the chosen answers, averaged over all their tokens in the batch (TRL's "sft").

    Args:
        chosen_per_token_logps: (B, T) log p_theta of each chosen token.
        chosen_mask: (B, T) 1 on the chosen answer's tokens.

    Returns:
        A scalar.
    """
    return -chosen_per_token_logps[chosen_mask.bool()].mean()


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of `logits` (B, T, V) and the log-prob of each label (B, T); labels < 0 give 0."""
    logprobs = logits.float().log_softmax(-1)
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logprobs, picked * (labels >= 0)
