"""The GRPO policy loss as small pure functions on tensors (no Lightning, no config, no strings of text).

For each completion token t of response i, with its advantage A_i (``algo.advantage``) and the
log-ratio x_it = log pi_theta - log pi_old per token (``token_log_ratio``) or its mean over the
sequence (GSPO, ``sequence_log_ratio``), rho = exp(x):
    l_it = -min(min(rho, delta) * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) * m_it + beta * KL_k3
    KL_k3 = exp(ref - logp) - (ref - logp) - 1                     (k3_kl)
where delta (INTELLECT-2) is off by default and m_it keeps the top-entropy share of tokens
(``top_entropy_mask``; all by default); ``PolicyLoss`` holds the choices, made once. Per-token
losses are aggregated per sequence then over the batch (``grpo``), over all tokens (``dapo``), or by
a constant (``dr_grpo``). The other losses (``LOSS_TYPES``: bnpo, cispo, sapo, luspo, vespo) swap the
clipped term and/or the aggregation, chosen once by name. When each rollout is used for one update,
pi_old = pi_theta.detach(), so rho = 1 in value but carries the policy gradient; with several
updates (``num_iterations``) pi_old is the log-prob stored before the first. Also here: the
(chunked) log-softmax of the completion tokens, the token entropy and the entropy bonus.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] without a full-vocabulary log-prob copy. (B, T, V), (B, T) -> (B, T)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    # half precision: upcast one row at a time so the float32 copy stays small
    out = []
    for row_logits, row_index in zip(logits, index, strict=True):
        row = row_logits.float()
        out.append(row.gather(-1, row_index.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(out)


# elements of one chunk's (tokens x vocabulary) logits in :func:`chunked_selective_log_softmax`:
# 2^26 float32 values = 256 MiB, 441 tokens at Qwen2.5's vocabulary of 151,936
CHUNK_ELEMENTS = 2 ** 26


class _ChunkedLinearLogProb(torch.autograd.Function):
    """log_softmax(scale * hidden @ weight.T)[i, index[i]] for (N, H) hidden and (V, H) weight, ``chunk``
    rows at a time, and each row's entropy when asked. Only the (N,) log-sum-exps (and entropies) are
    kept for backward, which recomputes each chunk's logits l: d logp_i / d l_ij = 1[j = index_i] -
    softmax_ij and d H_i / d l_ij = -softmax_ij * (l_ij - (lse_i - H_i)), times ``scale`` for the raw
    logits. Hidden states and weight may differ in dtype (an fp32 head on bf16 hidden states): the
    matmuls run in the wider one."""

    @staticmethod
    def forward(ctx, hidden, weight, index, scale: float, chunk: int, entropy: bool):
        ftype = torch.promote_types(hidden.dtype, torch.float32)  # float32, or float64 for float64 inputs
        mtype = torch.promote_types(hidden.dtype, weight.dtype)  # the matmuls' dtype
        out = torch.empty(hidden.shape[0], dtype=ftype, device=hidden.device)
        lse = torch.empty_like(out)
        # each token's entropy from the same chunk, lse - sum softmax * logits (empty when not asked for)
        ent = torch.empty(hidden.shape[0] if entropy else 0, dtype=ftype, device=hidden.device)
        w = weight.to(mtype)
        for s in range(0, hidden.shape[0], chunk):
            logits = (hidden[s:s + chunk].to(mtype) @ w.T).to(ftype) * scale  # (c, V)
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            out[s:s + chunk] = logits.gather(-1, index[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
            if entropy:
                probs = torch.exp(logits - lse[s:s + chunk, None])
                ent[s:s + chunk] = lse[s:s + chunk] - (probs * logits).sum(-1)
        ctx.save_for_backward(hidden, weight, index, lse, ent)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.set_materialize_grads(False)
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, grad_ent):
        hidden, weight, index, lse, ent = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_ent is not None and ent.numel() == 0:
            grad_ent = None
        mtype = torch.promote_types(hidden.dtype, weight.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        # half-precision weights: the chunks' weight gradients are summed in float32
        acc = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        w = weight.to(mtype)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].to(mtype)
            logits = (h @ w.T).to(lse.dtype) * scale
            probs = torch.exp(logits - lse[s:s + chunk, None])
            d = None  # (c, V) gradient of the chunk's scaled logits, built in the buffers above
            if grad_ent is not None:  # -g_H * softmax * (l - E_softmax[l]), in the logits' buffer
                mean_logit = (lse[s:s + chunk] - ent[s:s + chunk])[:, None]
                d = logits.sub_(mean_logit).mul_(probs).mul_(-grad_ent[s:s + chunk].to(lse.dtype)[:, None])
            if grad_out is not None:
                g = grad_out[s:s + chunk].to(lse.dtype)
                lp = probs.mul_(-g[:, None])  # -g * softmax
                lp.scatter_add_(-1, index[s:s + chunk, None], g[:, None])  # + g at the target
                d = lp if d is None else d.add_(lp)
            if d is None:
                d = torch.zeros_like(probs)
            d = d.mul_(scale).to(mtype)  # (c, V) gradient of the chunk's raw logits
            if need_h:
                grad_h[s:s + chunk] = (d @ w).to(hidden.dtype)
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
    """:func:`chunked_selective_log_softmax` and, when ``entropy``, each token's entropy (float32, or
    float64 for float64 inputs) made from the same logit chunks (as :func:`token_entropy` of the whole
    logits), with its gradient (the entropy bonus); else None."""
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
    """The policy term per token and where each side of the clip (or the cap) was active."""

    loss: torch.Tensor  # (B, T) e.g. -min(rho * A, clip(rho) * A)
    low: torch.Tensor  # (B, T) bool: rho < 1 - eps_low with A < 0 (the clipped branch counts)
    high: torch.Tensor  # (B, T) bool: rho > 1 + eps_high with A > 0 (cispo: rho above its cap with A > 0)

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


def cispo_surrogate(log_ratio: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor, cap: float) -> Surrogate:
    """CISPO (MiniMax-M1): the importance weight itself is capped and detached, and multiplies the
    REINFORCE term: -sg[min(rho, cap)] * A * log pi. Every token keeps a gradient (none is clipped
    away), sg[min(rho, cap)] * A * grad log pi; at rho = 1 (and cap >= 1) this is the plain policy
    gradient. ``high`` marks the capped tokens with A > 0 (TRL's ``cispo_clip_ratio``)."""
    ratio = torch.exp(log_ratio).detach()
    adv = advantages.unsqueeze(-1)
    loss = -torch.clamp(ratio, max=cap) * adv * logp
    return Surrogate(loss, torch.zeros_like(loss, dtype=torch.bool), (ratio > cap) & (adv > 0))


def sapo_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float, tau_neg: float) -> Surrogate:
    """SAPO's soft gate instead of the hard clip: -(4 / tau) * sigmoid(tau * (rho - 1)) * A, with
    tau = ``tau_pos`` where A > 0 and ``tau_neg`` elsewhere. Its derivative in rho is
    4 * sigma * (1 - sigma), 1 at rho = 1 (the plain policy gradient there), decaying smoothly as rho
    leaves 1 (faster for a larger tau) instead of dropping to 0 at the clip edge."""
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1)
    tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
    loss = -torch.sigmoid(tau * (ratio - 1)) * (4 / tau) * adv
    none = torch.zeros_like(loss, dtype=torch.bool)
    return Surrogate(loss, none, none)


def vespo_weights(log_ratio: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, k_pos: float,
                  lambda_pos: float, k_neg: float, lambda_neg: float) -> torch.Tensor:
    """VESPO's Gamma weight of each sequence's importance weight, (B, 1), no gradient:
    phi(w) = exp(lambda + k log w - lambda w) (so phi(1) = 1), w = exp(sum_t log rho_t) over the
    completion tokens, (k, lambda) = (``k_pos``, ``lambda_pos``) where A >= 0, else the ``neg`` pair.
    The token log-ratios are clamped to [-20, 20] and log w to [log 1e-8, 20]; a weight that over- or
    underflows is 0."""
    with torch.no_grad():
        seq = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
        log_w = torch.clamp(seq, math.log(1e-8), 20.0)
        nonneg = advantages.unsqueeze(-1) >= 0
        k = torch.where(nonneg, torch.full_like(log_w, k_pos), torch.full_like(log_w, k_neg))
        lam = torch.where(nonneg, torch.full_like(log_w, lambda_pos), torch.full_like(log_w, lambda_neg)).clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo_surrogate(log_ratio: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                    k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float) -> Surrogate:
    """VESPO: -phi(w) * A * log pi per token (:func:`vespo_weights`): the REINFORCE term scaled by a
    smooth weight of the whole sequence's importance weight instead of a clip; phi(1) = 1, so at
    ratio 1 it is the plain policy gradient."""
    phi = vespo_weights(log_ratio, mask, advantages, k_pos, lambda_pos, k_neg, lambda_neg)
    loss = -phi * advantages.unsqueeze(-1) * logp
    none = torch.zeros_like(loss, dtype=torch.bool)
    return Surrogate(loss, none, none)


def off_policy_mask(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
                    threshold: float) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask, (B, 1) float: a completion is dropped (0) when its
    advantage is negative and its mean token log(pi_old / pi_theta) over the completion tokens exceeds
    ``threshold`` (the policy moved far from what sampled it); kept (1) otherwise."""
    kl = ((old_logp - logp.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    keep = (advantages.unsqueeze(-1) >= 0) | (kl <= threshold)
    return keep.to(mask.dtype)


# ---------------------------------------------------------------- the sampler/trainer gap

def rollout_gap(train_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the sampler's log-probs are from the trainer's for the same tokens, over the ``mask``ed
    completion tokens ((B, T) each): sums and counts, so micro-batches add up (:func:`gap_metrics`).
    ``abs_diff``: summed |log pi_train - log pi_sampler| (NeMo-RL's token_mult_prob_error is the mean of
    its exp); ``kl``: summed k3 estimate of KL(pi_sampler || pi_train) per token, r - 1 - log r with
    r = pi_train / pi_sampler (the tokens were drawn from the sampler, so it is unbiased and >= 0; summed
    over a sequence it is the sequence's KL, NeMo-RL's gen_kl_error); ``ratio_max``: the largest token r;
    ``tokens`` and ``rows``: the counted tokens and the rows that have any."""
    with torch.no_grad():
        m = mask.bool()
        ftype = torch.promote_types(train_logp.dtype, torch.float32)  # float32, or float64 for float64 inputs
        d = (train_logp.detach().to(ftype) - sampling_logp.to(ftype)).masked_fill(~m, 0.0)
        r = torch.exp(d)
        return {"abs_diff": d.abs().sum(), "kl": (r - 1 - d).masked_fill(~m, 0.0).sum(),
                "ratio_max": r.masked_fill(~m, 0.0).max() if m.any() else d.new_zeros(()),
                "tokens": m.sum().to(d.dtype), "rows": m.any(-1).sum().to(d.dtype)}


# grpo.rollout_is -> (level, action): TRL's vllm_importance_sampling_mode names
ROLLOUT_IS_MODES = {"token_truncate": ("token", "truncate"), "token_mask": ("token", "mask"),
                    "sequence_truncate": ("sequence", "truncate"), "sequence_mask": ("sequence", "mask")}


class ISWeights(NamedTuple):
    """The rollout's importance weights and where the ratio exceeded the cap."""

    weights: torch.Tensor  # (B, T) float, no gradient; 1 outside the mask
    capped: torch.Tensor  # (B, T) bool: the (token or sequence) ratio was above the cap (truncated or masked)


def rollout_is_weights(old_logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> ISWeights:
    """Importance weights against the sampler/trainer gap, (B, T), no gradient: the ratio
    w = pi_old / pi_sampler of each token (``token_*``), or of each sequence, exp of the summed token
    log-ratios over its completion tokens (``sequence_*``, every token of the row holding it);
    ``*_truncate`` caps w at ``cap`` (TIS), ``*_mask`` sets a w above ``cap`` to 0 (MIS: the token, or
    the whole sequence, leaves the policy term). Masked-out positions get 1 (they count for nothing)."""
    level, action = ROLLOUT_IS_MODES[mode]
    with torch.no_grad():
        log_w = (old_logp.detach() - sampling_logp) * mask
        if level == "sequence":
            log_w = log_w.sum(-1, keepdim=True).expand_as(mask)
        w = torch.exp(log_w.clamp(max=80.0))  # e^80 overflows no float32 and lies far above any cap
        capped = (w > cap) & mask.bool()
        w = w.clamp(max=cap) if action == "truncate" else w.masked_fill(capped, 0.0)
        return ISWeights(torch.where(mask.bool(), w, torch.ones_like(w)), capped)


class TokenLoss(NamedTuple):
    loss: torch.Tensor  # (B, T) policy term (times the token and off-policy masks) + beta * KL
    kl: torch.Tensor  # (B, T) the KL term as in the loss (k3, times the ratio with bias correction), detached
    low: torch.Tensor  # (B, T) bool, see Surrogate
    high: torch.Tensor  # (B, T) bool
    masked: torch.Tensor  # (B, 1) bool: completions the off-policy mask dropped (all False without it)


def _per_sequence_mean(summed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return summed / mask.sum(-1).clamp(min=1)


def _per_sequence_sum(summed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return summed


@dataclass(frozen=True)
class Aggregation:
    """How per-token losses become the batch's scalar: a per-sequence term from the summed token values,
    summed over the rows and divided by ``normalizer(mask, max_completion_length)`` of the whole batch;
    ``local`` (bnpo): each micro-batch is divided by its own counted tokens instead, and the layer's
    loss is the mean over its micro-batches (TRL's local batch = our micro-batch)."""

    per_sequence: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    normalizer: Callable[[torch.Tensor, int], float]
    local: bool = False

    def sequence_terms(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T) per-token values -> (B,) per-sequence terms, to be summed and divided by the
        normaliser (so micro-batches add up to the whole batch's loss)."""
        return self.per_sequence((per_token * mask).sum(-1), mask)

    def pass_normalizer(self, mask: torch.Tensor, batch_norm: float, passes: int) -> float:
        """What one micro-batch's (mask: its (b, T) counted tokens) summed sequence terms are divided by:
        the whole batch's ``batch_norm``, or, ``local``, its own counted tokens times the number of
        micro-batches (the layer's loss is then the mean of the micro-batches' token means)."""
        if not self.local:
            return batch_norm
        return float(max(mask.sum().item(), 1)) * max(passes, 1)


def _rows(mask: torch.Tensor, length: int) -> float:
    return float(max(mask.shape[0], 1))


def _tokens(mask: torch.Tensor, length: int) -> float:
    return float(max(mask.sum().item(), 1))


def _constant(mask: torch.Tensor, length: int) -> float:
    return float(max(mask.shape[0] * length, 1))


PER_SEQUENCE_MEAN = Aggregation(_per_sequence_mean, _rows)  # 1/|o_i|, then the mean over rows
TOKEN_MEAN = Aggregation(_per_sequence_sum, _tokens)  # every token of the batch alike
CONSTANT = Aggregation(_per_sequence_sum, _constant)  # Dr. GRPO: rows x max_completion_length
LOCAL_TOKEN_MEAN = Aggregation(_per_sequence_sum, _tokens, local=True)
LENGTH_SCALED = Aggregation(_per_sequence_sum, _rows)  # LUSPO: the sequence's mean times its length, mean over rows


def _clip_objective(p: PolicyLoss, x, logp, mask, adv) -> Surrogate:
    return clipped_surrogate(x, adv, p.eps_low, p.eps_high, p.delta)


def _cispo_objective(p: PolicyLoss, x, logp, mask, adv) -> Surrogate:
    return cispo_surrogate(x, logp, adv, p.eps_high)


def _sapo_objective(p: PolicyLoss, x, logp, mask, adv) -> Surrogate:
    return sapo_surrogate(x, adv, p.settings["sapo_temperature_pos"], p.settings["sapo_temperature_neg"])


def _vespo_objective(p: PolicyLoss, x, logp, mask, adv) -> Surrogate:
    s = p.settings
    return vespo_surrogate(x, logp, mask, adv, s["vespo_k_pos"], s["vespo_lambda_pos"], s["vespo_k_neg"],
                           s["vespo_lambda_neg"])


@dataclass(frozen=True)
class LossType:
    """One ``grpo.loss_type``: its policy term, the aggregation of its per-token losses, whether the term
    is PPO's clipped ratio (``delta`` caps only that; ``config.rules`` reads it), and the ``grpo.*``
    settings of its own that the term reads (``PolicyLoss.settings``; their defaults are the schema's)."""

    objective: Callable[..., Surrogate]
    aggregation: Aggregation
    clipped: bool
    settings: tuple[str, ...] = ()


# grpo.loss_type -> its one entry
LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType(_clip_objective, PER_SEQUENCE_MEAN, clipped=True),
    "dapo": LossType(_clip_objective, TOKEN_MEAN, clipped=True),
    "dr_grpo": LossType(_clip_objective, CONSTANT, clipped=True),
    "bnpo": LossType(_clip_objective, LOCAL_TOKEN_MEAN, clipped=True),
    "luspo": LossType(_clip_objective, LENGTH_SCALED, clipped=True),
    "cispo": LossType(_cispo_objective, TOKEN_MEAN, clipped=False),
    "sapo": LossType(_sapo_objective, PER_SEQUENCE_MEAN, clipped=False,
                     settings=("sapo_temperature_pos", "sapo_temperature_neg")),
    "vespo": LossType(_vespo_objective, TOKEN_MEAN, clipped=False,
                      settings=("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")),
}
AGGREGATIONS: dict[str, Aggregation] = {name: t.aggregation for name, t in LOSS_TYPES.items()}


@dataclass(frozen=True)
class PolicyLoss:
    """The per-token GRPO loss with its variants fixed once (:func:`policy_loss` builds it), and the
    aggregation of its loss type.

    ``old_logp`` None means pi_old = pi_theta.detach() (one update per rollout: rho = 1 in value, the
    policy gradient in its gradient). ``token_mask`` (top-entropy tokens) and ``is_weights`` (the
    sampler/trainer gap's importance weights, :func:`rollout_is_weights`) multiply the policy term
    only; the KL term and the aggregation mask stay on every completion token (as TRL). ``objective``
    is the policy term of the loss type (``LOSS_TYPES``) and ``settings`` its own settings;
    ``off_policy_threshold`` drops far off-policy negative-advantage completions from the policy term;
    ``bias_correction_kl`` multiplies the KL term by the ratio (the unbiased estimate of
    KL(pi_theta || pi_ref) under pi_old's samples).
    """

    eps_low: float
    eps_high: float
    delta: float | None
    beta: float
    log_ratio: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    objective: Callable[..., Surrogate]
    aggregation: Aggregation
    settings: dict[str, float]
    off_policy_threshold: float | None
    bias_correction_kl: bool

    def __call__(self, logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                 old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                 token_mask: torch.Tensor | None = None, is_weights: torch.Tensor | None = None) -> TokenLoss:
        old = logp.detach() if old_logp is None else old_logp
        x = self.log_ratio(logp, old, mask)
        sur = self.objective(self, x, logp, mask, advantages)
        loss = sur.loss if token_mask is None else sur.loss * token_mask
        if is_weights is not None:  # the rollout's importance weights (rollout_is_weights), policy term only
            loss = loss * is_weights
        masked = torch.zeros(logp.shape[0], 1, dtype=torch.bool, device=logp.device)
        if self.off_policy_threshold is not None:
            keep = off_policy_mask(logp, old, mask, advantages, self.off_policy_threshold)
            loss, masked = loss * keep, keep == 0
        if self.beta > 0 and ref_logp is not None:
            kl = k3_kl(logp, ref_logp)
            if self.bias_correction_kl:
                kl = kl * torch.exp(x)
            loss = loss + self.beta * kl
        else:
            kl = torch.zeros_like(logp)
        return TokenLoss(loss, kl.detach(), sur.low, sur.high, masked)


def policy_loss(importance_sampling_level: str = "token", epsilon: float = 0.2, epsilon_high: float | None = None,
                delta: float | None = None, beta: float = 0.0, loss_type: str = "grpo", *,
                off_policy_threshold: float | None = None, bias_correction_kl: bool = False,
                **settings: float) -> PolicyLoss:
    """The :class:`PolicyLoss` of these settings (TRL's names; epsilon_high None = epsilon; for
    ``cispo`` epsilon_high is the cap of the importance weight itself, TRL's and ScaleRL's eps_max).
    ``settings``: the loss type's own (``LossType.settings``, e.g. ``sapo_temperature_pos``); one not
    given takes the schema's default (``vespo=(k_pos, lambda_pos, k_neg, lambda_neg)``, the earlier
    form, is still read for one release)."""
    from mgrpo_cli.config.schema import GRPOConfig

    if importance_sampling_level not in LOG_RATIOS:
        raise ValueError(f"importance_sampling_level: expected one of {tuple(LOG_RATIOS)}, "
                         f"got {importance_sampling_level!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {tuple(LOSS_TYPES)}, got {loss_type!r}")
    kind = LOSS_TYPES[loss_type]
    if "vespo" in settings:  # the one-release alias of the four VESPO settings as one tuple
        settings.update(zip(LOSS_TYPES["vespo"].settings, settings.pop("vespo"), strict=True))
    unknown = sorted(set(settings) - set(kind.settings))
    if unknown:
        raise ValueError(f"loss_type={loss_type} has no setting {unknown[0]!r}; its settings: {kind.settings}")
    own = {name: settings.get(name, getattr(GRPOConfig, name)) for name in kind.settings}
    return PolicyLoss(epsilon, epsilon if epsilon_high is None else epsilon_high, delta, beta,
                      LOG_RATIOS[importance_sampling_level], kind.objective, kind.aggregation, own,
                      off_policy_threshold, bias_correction_kl)


def sequence_terms(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """(B, T) per-token values -> (B,) per-sequence terms of ``loss_type`` (:meth:`Aggregation.sequence_terms`)."""
    return AGGREGATIONS[loss_type].sequence_terms(per_token, mask)


def loss_normalizer(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> float:
    """What the summed sequence terms of the whole batch (mask: (B, T)) are divided by."""
    return AGGREGATIONS[loss_type].normalizer(mask, max_completion_length)


def pass_normalizer(mask: torch.Tensor, loss_type: str, batch_norm: float, passes: int) -> float:
    """What one micro-batch's summed sequence terms are divided by (:meth:`Aggregation.pass_normalizer`)."""
    return AGGREGATIONS[loss_type].pass_normalizer(mask, batch_norm, passes)


def token_entropy(logits: torch.Tensor, chunk_rows: int = 8, grad: bool = False) -> torch.Tensor:
    """Entropy of each position's next-token distribution, (B, T, V) -> (B, T) float32 (float64 for
    float64 logits); with a gradient only when ``grad`` (the entropy bonus).

    H = logsumexp(l) - sum_v softmax(l)_v * l_v, computed ``chunk_rows`` rows at a time (upcast per
    chunk) so the float32 softmax copy stays at chunk_rows x T x V (without ``grad``)."""
    out = []
    ftype = torch.promote_types(logits.dtype, torch.float32)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        for chunk in logits.split(chunk_rows):
            chunk = chunk.to(ftype)
            lse = torch.logsumexp(chunk, dim=-1, keepdim=True)
            out.append(lse.squeeze(-1) - (torch.exp(chunk - lse) * chunk).sum(-1))
    return torch.cat(out) if out else logits.new_zeros(logits.shape[:-1], dtype=ftype)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, tokens: float) -> torch.Tensor:
    """The entropy term of a micro-batch: sum of its counted tokens' entropies / ``tokens`` (the counted
    tokens of the whole layer), so the micro-batches add up to the layer's mean token entropy, which the
    loss subtracts times the coefficient (TRL's ``entropy_coef``; the same meaning for every loss type)."""
    return (entropy * mask).sum() / max(tokens, 1.0)


def next_entropy_coef(coef: float, entropy: float, target: float, step: float, low: float, high: float) -> float:
    """Skywork-OR1's adaptive entropy control, one optimizer step: the coefficient grows by ``step`` (up to
    ``high``) when the entropy is at or below ``target``, else shrinks by ``step`` (down to ``low``)."""
    return min(coef + step, high) if entropy <= target else max(coef - step, low)


def applied_entropy_coef(coef: float, last_entropy: float, adaptive: bool, target: float) -> float:
    """The coefficient a step applies: ``coef``; adaptively only while the last step's entropy was at or
    below ``target`` (0 otherwise: the bonus switches on when the entropy collapses)."""
    return coef if not adaptive or last_entropy <= target else 0.0


@torch.no_grad()
def mix_into(target: Sequence[torch.Tensor], source: Sequence[torch.Tensor], alpha: float) -> None:
    """TR-DPO's reference update, in place: target = alpha * source + (1 - alpha) * target, tensor by tensor."""
    for t, s in zip(target, source, strict=True):
        t.mul_(1.0 - alpha).add_(s.to(t.dtype), alpha=alpha)


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
