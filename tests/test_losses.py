"""The preference losses TRL lacks (videollm.train.losses), checked against values computed by hand."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from videollm.train.losses import NO_PHRASE, gather_logprobs, phrase_rewards, rrpo_loss, sft_loss, token_kl


def probs_to_logprobs(rows: list[list[list[float]]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).log()


def test_rrpo_loss_equals_hand_computed_value():
    beta, alpha = 0.1, 0.01
    # chosen: phrase 0 = tokens 1-2, phrase 1 = token 3; token 0 is outside every phrase
    chosen_logratios = torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=torch.float64)
    chosen_phrases = torch.tensor([[NO_PHRASE, 0, 0, 1]])
    # rejected: one phrase, tokens 0-1
    rejected_logratios = torch.tensor([[1.0, 0.5, -0.5, 3.0]], dtype=torch.float64)
    rejected_phrases = torch.tensor([[0, 0, NO_PHRASE, NO_PHRASE]])
    chosen_rewards = phrase_rewards(chosen_logratios, chosen_phrases, beta)
    rejected_rewards = phrase_rewards(rejected_logratios, rejected_phrases, beta)
    assert torch.allclose(chosen_rewards, torch.tensor([[0.1 * (-1.0 + 2.0), 0.1 * 0.25]], dtype=torch.float64))
    assert torch.allclose(rejected_rewards, torch.tensor([[0.1 * (1.0 + 0.5)]], dtype=torch.float64))

    # KL(p_ref || p_theta) at the two chosen answer positions: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75), then 0;
    # the third position differs a lot but is masked out
    ref = probs_to_logprobs([[[0.5, 0.5], [0.9, 0.1], [0.99, 0.01]]])
    policy = probs_to_logprobs([[[0.25, 0.75], [0.9, 0.1], [0.01, 0.99]]])
    chosen_kl = token_kl(ref, policy, torch.tensor([[1, 1, 0]]))
    assert torch.allclose(chosen_kl, torch.tensor([0.5 * math.log(4 / 3)], dtype=torch.float64))

    loss = rrpo_loss(chosen_rewards, rejected_rewards, chosen_kl, alpha)
    margin = (0.1 + 0.025) - 0.15
    expected = math.log1p(math.exp(-margin)) + alpha * 0.5 * math.log(4 / 3)
    assert loss.shape == (1,)
    assert math.isclose(loss.item(), expected, rel_tol=1e-12)


def test_rrpo_with_one_phrase_per_answer_and_no_kl_is_sigmoid_dpo():
    generator = torch.Generator().manual_seed(0)
    beta = 0.1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    chosen = torch.randn(3, 5, generator=generator) * mask
    rejected = torch.randn(3, 5, generator=generator) * mask
    whole_answer = torch.where(mask.bool(), 0, NO_PHRASE)
    loss = rrpo_loss(
        phrase_rewards(chosen, whole_answer, beta),
        phrase_rewards(rejected, whole_answer, beta),
        chosen_kl=torch.full((3,), 123.0),
        alpha=0.0,
    )
    sigmoid_dpo = -F.logsigmoid(beta * (chosen.sum(1) - rejected.sum(1)))  # TRL's "sigmoid" on sequence sums
    assert torch.allclose(loss, sigmoid_dpo, atol=1e-7)


def test_token_kl_is_zero_for_equal_distributions_and_positive_otherwise():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 7, generator=generator)
    mask = torch.ones(2, 4)
    same = logits.log_softmax(-1)
    assert torch.allclose(token_kl(same, same, mask), torch.zeros(2), atol=1e-6)
    other = (logits + torch.randn(2, 4, 7, generator=generator)).log_softmax(-1)
    assert (token_kl(same, other, mask) > 0).all()


def test_phrase_rewards_of_a_pair_without_phrases_are_zero_sized_safely():
    rewards = phrase_rewards(torch.ones(2, 3), torch.full((2, 3), NO_PHRASE), beta=0.1)
    assert rewards.shape == (2, 1) and torch.equal(rewards, torch.zeros(2, 1))


def test_sft_loss_is_mean_nll_over_all_chosen_tokens():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert math.isclose(sft_loss(logps, mask).item(), (1.0 + 2.0 + 4.0) / 3, rel_tol=1e-6)


def test_gather_logprobs_picks_label_logprobs_and_zeroes_ignored_positions():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(3.0), 0.0]]])
    logprobs, picked = gather_logprobs(logits, torch.tensor([[1, -100]]))
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(1, 2))
    assert torch.allclose(picked, torch.tensor([[math.log(0.75), 0.0]]))
