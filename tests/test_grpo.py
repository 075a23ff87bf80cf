"""GRPO math on literal tensors with hand-computed values."""
import math

import pytest
import torch

from mgrpo_cli import grpo

NAN = float("nan")


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    adv = grpo.group_advantages(r, "group", eps=0.0)
    # group 1: mean 0.5, unbiased std sqrt(1/3)
    s1 = math.sqrt(1 / 3)
    assert torch.allclose(adv[0], torch.tensor([0.5 / s1, -0.5 / s1, -0.5 / s1, 0.5 / s1]))
    # group 2: mean 0.25, unbiased std 0.5
    assert torch.allclose(adv[1], torch.tensor([1.5, -0.5, -0.5, -0.5]))


def test_zero_variance_group_gets_zero_advantage():
    r = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = grpo.group_advantages(r, "group")
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[1], torch.zeros(3))
    assert grpo.zero_variance_share(r) == pytest.approx(2 / 3)


def test_ungradable_left_out_of_group_statistics():
    r = torch.tensor([[1.0, NAN, 0.0]])
    adv = grpo.group_advantages(r, "group", eps=0.0)
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert torch.allclose(adv, torch.tensor([[0.5 / s, 0.0, -0.5 / s]]))
    assert grpo.zero_variance_share(torch.tensor([[1.0, NAN, NAN]])) == 1.0


def test_batch_and_no_scaling():
    r = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    none = grpo.group_advantages(r, "none")
    assert torch.allclose(none, torch.tensor([[0.5, -0.5], [0.0, 0.0]]))
    batch = grpo.group_advantages(r, "batch", eps=0.0)
    std = torch.tensor([1.0, 0.0, 1.0, 1.0]).std()
    assert torch.allclose(batch, none / std)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.group_advantages(r, "groups")


def test_k3_kl_values():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.5), math.log(0.4)])
    kl = grpo.k3_kl(logp, ref)
    assert kl[0].item() == pytest.approx(0.0)
    assert kl[1].item() == pytest.approx(2.0 - math.log(2.0) - 1.0)


def test_clipped_surrogate_clips_both_sides():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    loss, clipped = grpo.clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.2)
    # A > 0: ratio 1.5 clipped to 1.2; ratio 0.5 not clipped (min picks 0.5); 1.1 inside
    assert torch.allclose(loss, -torch.tensor([[1.2, 0.5, 1.1]]))
    assert clipped.tolist() == [[True, False, False]]
    loss_neg, clipped_neg = grpo.clipped_surrogate(logp, old, torch.tensor([-1.0]), 0.2, 0.2)
    # A < 0: min(-r, -clip(r)) -> 0.5 clipped to 0.8, 1.5 stays
    assert torch.allclose(loss_neg, torch.tensor([[1.5, 0.8, 1.1]]))
    assert clipped_neg.tolist() == [[False, True, False]]


def test_loss_aggregation_variants_on_masks():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    grpo_terms = grpo.sequence_terms(per_token, mask, "grpo")
    assert grpo_terms.tolist() == [2.0, 4.0]
    assert grpo_terms.sum() / grpo.loss_normalizer(mask, "grpo", 3) == pytest.approx(3.0)
    dapo = grpo.sequence_terms(per_token, mask, "dapo").sum() / grpo.loss_normalizer(mask, "dapo", 3)
    assert dapo.item() == pytest.approx(10.0 / 4.0)
    dr = grpo.sequence_terms(per_token, mask, "dr_grpo").sum() / grpo.loss_normalizer(mask, "dr_grpo", 5)
    assert dr.item() == pytest.approx(10.0 / 10.0)
    with pytest.raises(ValueError, match="loss_type"):
        grpo.sequence_terms(per_token, mask, "ppo")


def test_grpo_loss_gradient_is_policy_gradient():
    # one update per rollout: ratio = 1, so dL/dlogp_t = -A / |o| for each valid token (grpo aggregation)
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = grpo.grpo_loss(logp, adv, mask)
    loss.backward()
    expected = torch.tensor([[-2.0 / 2 / 2, -2.0 / 2 / 2], [1.0 / 1 / 2, 0.0]])
    assert torch.allclose(logp.grad, expected)
    assert loss.item() == pytest.approx(-(2.0 + -1.0) / 2)


def test_kl_term_enters_loss_only_with_beta():
    logp = torch.tensor([[-1.0]])
    ref = torch.tensor([[-2.0]])
    mask = torch.ones(1, 1)
    adv = torch.zeros(1)
    assert grpo.grpo_loss(logp, adv, mask, ref_logp=ref, beta=0.0).item() == pytest.approx(0.0)
    kl = math.exp(-1.0) + 1.0 - 1.0
    assert grpo.grpo_loss(logp, adv, mask, ref_logp=ref, beta=0.1).item() == pytest.approx(0.1 * kl)


def test_selective_log_softmax_matches_full_and_half_precision():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 11)
    idx = torch.randint(0, 11, (2, 3))
    full = torch.log_softmax(logits, -1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(grpo.selective_log_softmax(logits, idx), full, atol=1e-6)
    half = grpo.selective_log_softmax(logits.bfloat16(), idx)
    assert half.dtype == torch.float32 and torch.allclose(half, full, atol=5e-2)
