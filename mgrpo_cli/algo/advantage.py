"""Advantages: what each response of a group is worth against the others (pure functions on tensors).

For a group of G responses to one input with rewards r_1..r_G:
    A_i = (r_i - mean(r)) / (std(r) + eps)                        (group_advantages)
with the std over the group (``scale=group``), over the batch (``batch``) or none. The other
estimators (``ADV_ESTIMATORS``: rloo, reinforce_plus_plus_baseline) replace the group normalisation,
and ``decoupled_advantages`` (GDPO) normalises each reward term before summing; ``advantage_fn``
makes the choice once. Ungradable responses carry a NaN reward: they are left out of the group
statistics and get zero advantage; a group whose rewards are all equal gets exactly zero.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SCALE_MODES = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """(n_groups, group_size) rewards, NaN = ungradable -> advantages of the same shape (NaN -> 0).

    A group whose gradable rewards are all equal (max == min, or fewer than two of them) gets exactly
    0 in every mode and with any ``eps`` (0 included): computing r - mean(r) in floating point would
    leave rounding noise (float32 rewards of 0.1 in a group of 8 give about 7e-5 / (0 + eps)), which
    would push the policy and defeat the skipping of zero-advantage rows.
    """
    if scale not in SCALE_MODES:
        raise ValueError(f"scale_rewards: expected one of {SCALE_MODES}, got {scale!r}")
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    n = valid.sum(-1, keepdim=True)
    flat = ~varied_groups(rewards).unsqueeze(-1)  # (n_groups, 1): no signal in this group
    mean = r.sum(-1, keepdim=True) / n.clamp(min=1)
    centred = torch.where(valid & ~flat, r - mean, torch.zeros_like(r))
    if scale == "group":
        # unbiased std within each group; flat groups divide 0 by 1 instead of by their (0 + eps)
        var = centred.pow(2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
        adv = centred / torch.where(flat, torch.ones_like(var), var.sqrt() + eps)
    elif scale == "batch":
        total = valid.sum()
        all_centred = torch.where(valid, r - r[valid].mean() if total else r, torch.zeros_like(r))
        std = (all_centred.pow(2).sum() / (total - 1).clamp(min=1)).sqrt()
        scale_by = std + eps  # 0 only when every group is flat (centred all zeros): divide by 1 then
        adv = centred / torch.where(scale_by > 0, scale_by, torch.ones_like(scale_by))
    else:
        adv = centred
    return torch.where(valid & ~flat, adv, torch.zeros_like(adv))


def varied_groups(rewards: torch.Tensor) -> torch.Tensor:
    """(n_groups, group_size) rewards, NaN = ungradable -> (n_groups,) bool: groups with at least two
    gradable rewards that differ (the others have zero advantages: DAPO's dynamic sampling drops them)."""
    valid = ~torch.isnan(rewards)
    hi = torch.where(valid, rewards, torch.full_like(rewards, -float("inf"))).amax(-1)
    lo = torch.where(valid, rewards, torch.full_like(rewards, float("inf"))).amin(-1)
    return (hi > lo) & (valid.sum(-1) >= 2)


def zero_variance_share(rewards: torch.Tensor) -> float:
    """Share of groups whose gradable rewards are all equal ("reward vanishing")."""
    return (~varied_groups(rewards)).float().mean().item()


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO (verl ``adv_estimator=rloo``): A_i = r_i - mean_{j != i} r_j over the gradable rewards of
    the group, = n / (n - 1) * (r_i - mean r) with n gradable rewards; no scaling. (n_groups, G) ->
    same shape; ungradable and flat groups (fewer than two gradable rewards, or all equal) get 0."""
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    n = valid.sum(-1, keepdim=True)
    others = (r.sum(-1, keepdim=True) - r) / (n - 1).clamp(min=1)  # mean of the group without row i
    keep = valid & varied_groups(rewards).unsqueeze(-1)
    return torch.where(keep, r - others, torch.zeros_like(r))


def reinforce_plus_plus_baseline_advantages(rewards: torch.Tensor, lengths: torch.Tensor,
                                            eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++ with a group baseline (verl ``reinforce_plus_plus_baseline``): r_i - mean of its
    group, then whitened over the whole batch as verl whitens its token-level advantages: mean and
    unbiased variance over every completion token (a completion counts ``lengths[i]`` times),
    (x - mean) / sqrt(var + eps). (n_groups, G) rewards and completion lengths -> advantages; ungradable
    completions, flat groups and empty completions get 0 and stay out of the batch statistics."""
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    n = valid.sum(-1, keepdim=True)
    centred = r - r.sum(-1, keepdim=True) / n.clamp(min=1)
    keep = valid & varied_groups(rewards).unsqueeze(-1)
    w = torch.where(valid, lengths.to(r.dtype), torch.zeros_like(r))  # tokens per completion
    total = w.sum()
    if total < 2:
        return torch.zeros_like(r)
    mean = (centred * w).sum() / total
    var = ((centred - mean).pow(2) * w).sum() / (total - 1)
    return torch.where(keep, (centred - mean) / torch.sqrt(var + eps), torch.zeros_like(r))


def decoupled_advantages(terms: torch.Tensor, weights: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GDPO's ``normalize_then_sum``: each reward term normalised within its group (as
    :func:`group_advantages` with ``group`` scaling: a flat term gives 0), the weighted sum, then that
    sum normalised over the batch, (s - mean) / (std + eps). (n_groups, G, K) term values (NaN =
    ungradable: the completion gets 0 and stays out of every statistic), (K,) weights -> (n_groups, G)."""
    valid = ~torch.isnan(terms).any(-1)  # (n_groups, G): every term graded
    per_term = torch.stack([group_advantages(torch.where(valid, terms[..., k], torch.full_like(valid, float("nan"),
                                                                                                dtype=terms.dtype)),
                                             "group", eps) for k in range(terms.shape[-1])], -1)
    summed = (per_term * weights.to(terms.dtype)).sum(-1)
    if valid.sum() < 2:
        return torch.zeros_like(summed)
    mean = summed[valid].mean()
    std = summed[valid].std()
    out = (summed - mean) / (std + eps) if std + eps > 0 else summed - mean
    return torch.where(valid, out, torch.zeros_like(out))


def _grpo_estimator(scale: str, eps: float):
    def estimate(rewards: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return group_advantages(rewards, scale, eps)
    return estimate


def _rloo_estimator(scale: str, eps: float):
    return lambda rewards, lengths: rloo_advantages(rewards)


def _rf_baseline_estimator(scale: str, eps: float):
    return lambda rewards, lengths: reinforce_plus_plus_baseline_advantages(rewards, lengths)


# grpo.adv_estimator -> (scale_rewards, std_eps) -> f((n_groups, G) rewards, (n_groups, G) lengths) -> advantages
ADV_ESTIMATORS: dict[str, Callable[[str, float], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "grpo": _grpo_estimator,
    "rloo": _rloo_estimator,
    "reinforce_plus_plus_baseline": _rf_baseline_estimator,
}


@dataclass(frozen=True)
class Advantages:
    """How a layer's rewards become advantages, chosen once (:func:`advantage_fn`): the estimator of
    the summed reward, or, with ``decoupled`` (GDPO), :func:`decoupled_advantages` of the reward terms."""

    estimate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    decoupled: bool = False
    eps: float = 1e-4

    def __call__(self, rewards: torch.Tensor, lengths: torch.Tensor, terms: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
        """(n_groups, G) summed rewards and completion lengths; with ``decoupled`` the (n_groups, G, K)
        weighted-sum's terms and their (K,) weights."""
        if self.decoupled and terms is not None:
            return decoupled_advantages(terms, weights, self.eps)
        return self.estimate(rewards, lengths)


def advantage_fn(estimator: str = "grpo", scale: str = "group", eps: float = 1e-4,
                 aggregation: str = "sum_then_normalize") -> Advantages:
    """The :class:`Advantages` of these settings (verl's ``adv_estimator``, TRL's ``multi_objective_aggregation``)."""
    if estimator not in ADV_ESTIMATORS:
        raise ValueError(f"adv_estimator: expected one of {tuple(ADV_ESTIMATORS)}, got {estimator!r}")
    if scale not in SCALE_MODES:
        raise ValueError(f"scale_rewards: expected one of {SCALE_MODES}, got {scale!r}")
    if aggregation not in ("sum_then_normalize", "normalize_then_sum"):
        raise ValueError(f"multi_objective_aggregation: expected sum_then_normalize or normalize_then_sum, "
                         f"got {aggregation!r}")
    return Advantages(ADV_ESTIMATORS[estimator](scale, eps), aggregation == "normalize_then_sum", eps)
