"""GRPO math as small pure functions on tensors (no Lightning, no config, no strings of text).

For a group of G responses to one input with rewards r_1..r_G:
    A_i = (r_i - mean(r)) / (std(r) + eps)                        (group_advantages)
and for each completion token t of response i, with the log-ratio x_it = log pi_theta - log pi_old
per token (``token_log_ratio``) or its mean over the sequence (GSPO, ``sequence_log_ratio``),
rho = exp(x):
    l_it = -min(min(rho, delta) * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) * m_it + beta * KL_k3
    KL_k3 = exp(ref - logp) - (ref - logp) - 1                     (k3_kl)
where delta (INTELLECT-2) is off by default and m_it keeps the top-entropy share of tokens
(``top_entropy_mask``; all by default); ``PolicyLoss`` holds the choices, made once. Per-token
losses are aggregated per sequence then over the batch (``grpo``), over all tokens (``dapo``), or by
a constant (``dr_grpo``). Ungradable responses carry a NaN reward: they are left out of the group
statistics and get zero advantage. When each rollout is used for one update, pi_old =
pi_theta.detach(), so rho = 1 in value but carries the policy gradient; with several updates
(``num_iterations``) pi_old is the log-prob stored before the first.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

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
    hi = torch.where(valid, rewards, torch.full_like(rewards, -float("inf"))).amax(-1, keepdim=True)
    lo = torch.where(valid, rewards, torch.full_like(rewards, float("inf"))).amin(-1, keepdim=True)
    flat = (hi <= lo) | (n < 2)  # (n_groups, 1): no signal in this group
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


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without a full-vocabulary log-prob copy. (B, T, V), (B, T) -> (B, T)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    # half precision: upcast one row at a time so the float32 copy stays small
    out = []
    for row_logits, row_index in zip(logits, index):
        row = row_logits.float()
        out.append(row.gather(-1, row_index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(out)


# elements of one chunk's (tokens x vocabulary) logits in :func:`chunked_selective_log_softmax`:
# 2^26 float32 values = 256 MiB, 441 tokens at Qwen2.5's vocabulary of 151,936
CHUNK_ELEMENTS = 2 ** 26


class _ChunkedLinearLogProb(torch.autograd.Function):
    """log_softmax(scale * hidden @ weight.T)[i, index[i]] for (N, H) hidden and (V, H) weight, ``chunk``
    rows at a time. Only the (N,) log-sum-exps are kept for backward, which recomputes each chunk's
    logits: d logp_i / d logit_ij = scale * (1[j = index_i] - softmax_ij)."""

    @staticmethod
    def forward(ctx, hidden, weight, index, scale: float, chunk: int, entropy: bool):
        ftype = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
        out = torch.empty(hidden.shape[0], dtype=ftype, device=hidden.device)
        lse = torch.empty_like(out)
        # each token's entropy from the same chunk, lse - sum softmax * logits (empty when not asked for)
        ent = torch.empty(hidden.shape[0] if entropy else 0, dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk] @ weight.T).to(ftype) * scale  # (c, V)
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            out[s:s + chunk] = logits.gather(-1, index[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if entropy:
                probs = torch.exp(logits - lse[s:s + chunk, None])
                ent[s:s + chunk] = lse[s:s + chunk] - (probs * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, index, lse)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.mark_non_differentiable(ent)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, grad_ent):
        hidden, weight, index, lse = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # half-precision weights: the chunks' weight gradients are summed in float32
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], chunk):
            h, g = hidden[s:s + chunk], grad_out[s:s + chunk].to(lse.dtype)
            logits = (h @ weight.T).to(lse.dtype) * scale
            d = torch.exp(logits - lse[s:s + chunk, None]).mul_(-g[:, None])  # -g * softmax
            d.scatter_add_(-1, index[s:s + chunk, None], g[:, None])  # + g at the target
            d = d.mul_(scale).to(hidden.dtype)  # (c, V) gradient of the chunk's logits
            if need_h:
                grad_h[s:s + chunk] = d @ weight
            if need_w and acc == d.dtype:
                grad_w.addmm_(d.T, h)
            elif need_w:
                grad_w += (d.T @ h).to(acc)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def chunked_selective_log_softmax(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                                  temperature: float = 1.0, chunk_tokens: int | None = None) -> torch.Tensor:
    """:func:`selective_log_softmax` of ``(hidden @ weight.T) / temperature`` without ever holding the
    whole (tokens x vocabulary) logits: (..., H) hidden states, (V, H) output weight (an lm_head
    without bias), (...) target ids -> (...) float32 log-probs (float64 for float64 inputs). The logits are made ``chunk_tokens``
    tokens at a time (default: ``CHUNK_ELEMENTS`` logits per chunk) and remade in backward, which
    costs one more (tokens x H x V) matmul. Equal to the unchunked path up to float rounding (tests)."""
    return chunked_log_probs_and_entropy(hidden, weight, index, temperature, chunk_tokens, entropy=False)[0]


def chunked_log_probs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, index: torch.Tensor,
                                  temperature: float = 1.0, chunk_tokens: int | None = None, *,
                                  entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunked_selective_log_softmax` and, when ``entropy``, each token's entropy (float32, no
    gradient) made from the same logit chunks (as :func:`token_entropy` of the whole logits); else None."""
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight.shape[0])
    scale = 1.0 / temperature if temperature > 0 else 1.0
    flat, ent = _ChunkedLinearLogProb.apply(hidden.reshape(-1, hidden.shape[-1]), weight, index.reshape(-1), scale,
                                            chunk, entropy)
    return flat.view(index.shape), ent.view(index.shape) if entropy else None


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref): exp(ref - logp) - (ref - logp) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(pi_theta / pi_old) per token, (B, T) (GRPO, PPO). ``mask`` is unused."""
    return logp - old_logp


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level log-ratio, (B, T): every token of row i holds the value
    s_i = mean over its completion tokens of (logp - old_logp), and the gradient of token t is that of
    logp_t alone (GSPO-token's form ``sg[s_i] + logp_t - sg[logp_t]``). With one advantage per sequence
    and per-sequence token means this is GSPO's objective and gradient, exp(s_i) * A_i * mean_t grad logp_t;
    unlike a broadcast s_i, a token-level mask (top-entropy tokens) then also stops that token's gradient."""
    seq = ((logp - old_logp) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return seq.detach() + (logp - logp.detach())


# grpo.importance_sampling_level -> the log-ratio function
LOG_RATIOS = {"token": token_log_ratio, "sequence": sequence_log_ratio}


class Surrogate(NamedTuple):
    """The clipped policy term per token and where each side of the clip range was active."""

    loss: torch.Tensor  # (B, T) -min(rho * A, clip(rho) * A)
    low: torch.Tensor  # (B, T) bool: rho < 1 - eps_low with A < 0 (the clipped branch counts)
    high: torch.Tensor  # (B, T) bool: rho > 1 + eps_high with A > 0

    @property
    def region(self) -> torch.Tensor:
        return self.low | self.high


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float,
                      delta: float | None = None) -> Surrogate:
    """PPO's clipped objective per token from log(rho), (B, T); advantages (B,).

    ``delta`` (INTELLECT-2's two-sided clipping): the unclipped ratio is capped at ``delta`` too, which
    bounds the loss of a negative-advantage token whose ratio has grown far above 1 + eps_high
    (the clip range alone never bounds it there). Needs delta > 1 + eps_high to leave A > 0 unchanged.
    """
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    capped = ratio if delta is None else torch.clamp(ratio, max=delta)
    loss = -torch.min(capped * adv, clipped)
    return Surrogate(loss, (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0))


class TokenLoss(NamedTuple):
    loss: torch.Tensor  # (B, T) policy term (times the token mask) + beta * KL
    kl: torch.Tensor  # (B, T) k3 KL, detached; zeros without a KL term
    low: torch.Tensor  # (B, T) bool, see Surrogate
    high: torch.Tensor  # (B, T) bool


@dataclass(frozen=True)
class PolicyLoss:
    """The per-token GRPO loss with its variants fixed once (:func:`policy_loss` builds it).

    ``old_logp`` None means pi_old = pi_theta.detach() (one update per rollout: rho = 1 in value, the
    policy gradient in its gradient). ``token_mask`` (top-entropy tokens) multiplies the policy term
    only; the KL term and the aggregation mask stay on every completion token (as TRL).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    log_ratio: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = token_log_ratio

    def __call__(self, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                 token_mask: torch.Tensor | None = None) -> TokenLoss:
        old = logp.detach() if old_logp is None else old_logp
        sur = clipped_surrogate(self.log_ratio(logp, old, mask), advantages, self.eps_low, self.eps_high, self.delta)
        loss = sur.loss if token_mask is None else sur.loss * token_mask
        if self.beta > 0 and ref_logp is not None:
            kl = k3_kl(logp, ref_logp)
            loss = loss + self.beta * kl
        else:
            kl = torch.zeros_like(logp)
        return TokenLoss(loss, kl.detach(), sur.low, sur.high)


def policy_loss(importance_sampling_level: str = "token", epsilon: float = 0.2, epsilon_high: float | None = None,
                delta: float | None = None, beta: float = 0.0) -> PolicyLoss:
    """The :class:`PolicyLoss` of these settings (TRL's names; epsilon_high None = epsilon)."""
    if importance_sampling_level not in LOG_RATIOS:
        raise ValueError(f"importance_sampling_level: expected one of {tuple(LOG_RATIOS)}, "
                         f"got {importance_sampling_level!r}")
    return PolicyLoss(epsilon, epsilon if epsilon_high is None else epsilon_high, delta, beta,
                      LOG_RATIOS[importance_sampling_level])


def _per_sequence_mean(summed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return summed / mask.sum(-1).clamp(min=1)


def _per_sequence_sum(summed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return summed


# loss_type -> (per-sequence term from the summed token values, the whole batch's normaliser)
AGGREGATIONS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                              Callable[[torch.Tensor, int], float]]] = {
    "grpo": (_per_sequence_mean, lambda mask, length: float(max(mask.shape[0], 1))),  # 1/|o_i|, then rows
    "dapo": (_per_sequence_sum, lambda mask, length: float(max(mask.sum().item(), 1))),  # every token alike
    "dr_grpo": (_per_sequence_sum, lambda mask, length: float(max(mask.shape[0] * length, 1))),  # a constant
}


def sequence_terms(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """(B, T) per-token values -> (B,) per-sequence terms, to be summed and divided by
    :func:`loss_normalizer` (so micro-batches add up to the whole batch's loss)."""
    return AGGREGATIONS[loss_type][0]((per_token * mask).sum(-1), mask)


def loss_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> float:
    """What the summed sequence terms of the whole batch (mask: (B, T)) are divided by."""
    return AGGREGATIONS[loss_type][1](mask, max_completion_length)


def grpo_token_loss(logp: torch.Tensor, advantages: torch.Tensor, *, old_logp: torch.Tensor | None = None,
                    ref_logp: torch.Tensor | None = None, beta: float = 0.0, eps_low: float = 0.2,
                    eps_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token token-level GRPO loss (B, T), the per-token KL (zeros when beta == 0) and the clip mask."""
    out = PolicyLoss(eps_low, eps_high, None, beta)(logp, advantages, torch.ones_like(logp), old_logp=old_logp,
                                                     ref_logp=ref_logp)
    return out.loss, out.kl, out.low | out.high


def grpo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, loss_type: str = "grpo",
              max_completion_length: int | None = None, **kw) -> torch.Tensor:
    """The whole-batch scalar loss (for tests and single-batch callers)."""
    per_token, _, _ = grpo_token_loss(logp, advantages, **kw)
    terms = sequence_terms(per_token, mask, loss_type)
    return terms.sum() / loss_normalizer(mask, loss_type, max_completion_length or mask.shape[1])


def truncated_rows(completion_ids: torch.Tensor, completion_mask: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, C) right-padded completions -> (B,) bool: rows whose last token is not EOS.

    Sampling stops a row at EOS or at its token budget, so these are the rows cut off by the budget
    (DAPO's overlong completions); an empty row is not truncated."""
    lengths = completion_mask.sum(-1)
    if completion_ids.shape[-1] == 0:
        return torch.zeros_like(lengths, dtype=torch.bool)
    last = completion_ids.gather(-1, (lengths - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lengths > 0) & (last != eos_token_id)


def token_entropy(logits: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """Entropy of each position's next-token distribution, (B, T, V) -> (B, T) float32, no gradient.

    H = logsumexp(l) - sum_v softmax(l)_v * l_v, computed ``chunk_rows`` rows at a time (upcast per
    chunk) so the float32 softmax copy stays at chunk_rows x T x V."""
    out = []
    with torch.no_grad():
        for chunk in logits.split(chunk_rows):
            chunk = chunk.float()
            lse = torch.logsumexp(chunk, dim=-1, keepdim=True)
            out.append(lse.squeeze(-1) - (torch.exp(chunk - lse) * chunk).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(logits.shape[:-1], dtype=torch.float32)


def top_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """(B, T) float mask of the completion tokens (``mask``) whose entropy is in the top ``quantile``
    share of the batch's: entropy >= the (1 - quantile) quantile over every masked token (ties kept).
    quantile 1.0 keeps every token."""
    valid = mask.bool()
    if quantile >= 1.0 or not valid.any():
        return mask.float()
    threshold = torch.quantile(entropies[valid].float(), 1.0 - quantile)
    return (valid & (entropies >= threshold)).float()


def length_stats(lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """Completion lengths (B,) and truncated rows (B,) bool -> mean/min/max length, the mean length of
    the completions that ended with EOS (0 when none did), and the truncated share (TRL's
    ``clipped_ratio``)."""
    lengths = lengths.float()
    done = lengths[~truncated]
    empty = lengths.numel() == 0
    return {
        "completion_length": 0.0 if empty else lengths.mean().item(),
        "completion_length_min": 0.0 if empty else lengths.min().item(),
        "completion_length_max": 0.0 if empty else lengths.max().item(),
        "terminated_length": done.mean().item() if done.numel() else 0.0,
        "clipped_ratio": 0.0 if empty else truncated.float().mean().item(),
    }


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return ((values * mask).sum() / mask.sum().clamp(min=1)).item()
