"""The GRPO loss of a layer's rollout, applied to the gradients micro-batch by micro-batch.

:func:`completion_logps` gives per-token log-probs of completions under a model (each group's prompt
runs once and its key/value cache serves the group's completions); :func:`micro_batches` splits a
rollout's rows into the cheapest batches under a token budget. A layer's loss is applied in two
steps, the same for every layer of MGRPO: :func:`prepare_layer_loss` fixes which tokens count
(``keep``; not the truncated completions, when masked) and, when an option needs it, runs one no-grad
pass that stores pi_old's log-probs (``num_iterations`` > 1) and the token entropies
(``top_entropy_quantile`` < 1); then each of the ``num_iterations`` optimizer steps runs
:func:`loss_pass`, which accumulates ``weight`` x the layer's loss (``LossSpec.policy``, aggregated
as its loss type says: over the layer's batch, or per micro-batch for bnpo; minus the entropy bonus
when the caller gives a coefficient) into the gradients. Under sharded training the caller gives a
``lockstep`` (every rank runs as many passes).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from mgrpo_cli.algo import grpo
from mgrpo_cli.models.loading import Fp32Head, base_model
from mgrpo_cli.rollout.engine import Rollout, trim_shared_padding


@dataclass(frozen=True)
class LossSpec:
    """What a layer's loss passes take, chosen once by the build step (``cli.build.loss_spec``). The
    sampling settings go to the rollout and the advantage estimator to the layer pipeline, not here."""

    policy: grpo.PolicyLoss  # the per-token loss and its aggregation (one grpo.LOSS_TYPES entry, settings bound)
    temperature: float  # log-probs are taken at the sampling temperature
    micro_batch_tokens: int  # the token budget of one micro-batch (:func:`micro_batches`)
    max_completion_length: int  # dr_grpo's constant normaliser
    num_iterations: int  # mu: optimizer steps per rollout, each a pass over the layer batches
    mask_truncated_completions: bool  # completions cut off by the budget leave the loss
    top_entropy_quantile: float  # share of completion tokens (highest entropy) in the policy term
    entropy_bonus: bool  # the loss carries an entropy term (its coefficient comes with each pass)
    # importance sampling against the sampler/trainer gap (grpo.ROLLOUT_IS_MODES; None = off) and its cap
    rollout_is: Optional[str]
    rollout_is_cap: float

    @property
    def runs_every_row(self) -> bool:
        """Whether zero-advantage completions run through the loss too: their loss is not zero with a KL
        term, their entropy has a gradient with an entropy bonus, and bnpo counts their tokens in its
        micro-batches' normalisers (TRL's local batch holds them)."""
        return self.policy.beta > 0 or self.entropy_bonus or self.policy.aggregation.local

    @property
    def needs_first_pass(self) -> bool:
        """Whether a no-grad pass runs before the updates (stored pi_old, or entropies for the token mask)."""
        return self.num_iterations > 1 or self.top_entropy_quantile < 1.0


# sharded training: n passes -> the largest n of any rank, so every rank runs as many forward/backward
# passes (each is a collective there), each one forward call; the extra passes carry zero weight
Lockstep = Callable[[int], int]


# vocabularies at least this large take the chunked log-prob path (:func:`completion_logps`): at
# Qwen2.5's 151,936 the whole logits of a 16k-token micro-batch are 4.6 GiB in bf16 plus 9.3 GiB in
# float32; below it (the tiny model's 260) the logits are small and one matmul is cheaper than two
CHUNKED_VOCAB = 32768


def output_weight(model) -> Optional[torch.Tensor]:
    """The (V, H) lm_head weight when the logits are ``decoder(x).last_hidden_state @ weight.T`` and
    nothing else (a plain bias-free ``nn.Linear`` head, not wrapped by an adapter, not sharded), else None."""
    base = base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) not in (torch.nn.Linear, Fp32Head) or head.bias is not None or not hasattr(base, "model"):
        return None
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return None  # sharded: the root module's hooks gather the head, calling the decoder alone skips them
    return head.weight


def _outputs(model, weight: Optional[torch.Tensor], keep: int = 0, **kw) -> torch.Tensor:
    """The model's logits of the last ``keep`` positions (all for 0), or, given the head ``weight``,
    its decoder's last hidden states there (the chunked path applies the head itself)."""
    if weight is None:
        return model(**kw, logits_to_keep=keep).logits
    hidden = base_model(model).model(**kw).last_hidden_state
    return hidden[:, -keep:] if keep else hidden


def completion_logps(model, rollout: Rollout, rows: torch.Tensor, temperature: float,
                     share_prompts: bool = True, chunked: Optional[bool] = None) -> torch.Tensor:
    """Per-token log-probs of the completions of ``rows`` under ``model``: (len(rows), C).

    Rows of a group share their prompt. Where ``rows`` hold runs of one group (as :func:`micro_batches`
    makes them), each prompt runs once and its key/value cache serves the run's completions
    (:func:`_shared_prompt_outputs`); otherwise prompt + completion run as one sequence per row. Both
    give the same log-probs and gradients, up to float rounding. ``share_prompts=False`` always makes
    one forward call (sharded training needs the same number of calls on every rank).

    ``chunked`` (default: when the vocabulary has at least ``CHUNKED_VOCAB`` tokens and the head
    allows it, :func:`output_weight`): the decoder's hidden states go through the lm_head chunk by
    chunk (:func:`grpo.chunked_selective_log_softmax`), so the (tokens x vocabulary) logits are never
    held whole; the same log-probs and gradients up to float rounding.
    """
    return completion_logps_and_entropy(model, rollout, rows, temperature, share_prompts, chunked, entropy=False)[0]


def completion_logps_and_entropy(model, rollout: Rollout, rows: torch.Tensor, temperature: float,
                                 share_prompts: bool = True, chunked: Optional[bool] = None, *,
                                 entropy: bool = True,
                                 entropy_grad: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`completion_logps` and, when ``entropy``, each position's next-token entropy at the same
    temperature, (len(rows), C) float32 (``grpo.token_entropy``; on the chunked path made from the same
    logit chunks as the log-probs), with its gradient when ``entropy_grad`` (the entropy bonus); else None."""
    weight = output_weight(model)
    if chunked is None:
        chunked = weight is not None and weight.shape[0] >= CHUNKED_VOCAB
    elif chunked and weight is None:
        raise ValueError("completion_logps: chunked=True needs a plain bias-free lm_head (no adapter, unsharded)")
    weight = weight if chunked else None
    prompt_ids, prompt_mask = rollout.prompt_ids[rows], rollout.prompt_mask[rows]
    comp_ids, comp_mask = rollout.completion_ids[rows], rollout.completion_mask[rows]
    prompt_ids, prompt_mask, comp_ids, comp_mask = trim_shared_padding(prompt_ids, prompt_mask, comp_ids, comp_mask)
    width = comp_ids.shape[1]
    first_of_run = _first_of_run(rows, rollout.n)
    # gradient checkpointing drops the cache in passes with gradients: one sequence per row then
    checkpointing = torch.is_grad_enabled() and any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    if share_prompts and int(first_of_run.sum()) < len(rows) and not checkpointing:
        out = _shared_prompt_outputs(model, weight, prompt_ids[first_of_run], prompt_mask[first_of_run], comp_ids,
                                     comp_mask, run_of_row=first_of_run.cumsum(0) - 1)
    else:
        ids = torch.cat([prompt_ids, comp_ids], 1)
        mask = torch.cat([prompt_mask, comp_mask], 1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = _outputs(model, weight, width + 1, input_ids=ids, attention_mask=mask,
                       position_ids=position_ids)[:, :-1]  # (b, width, V or H) predicting comp tokens
    ent = None
    if weight is not None:
        logps, ent = grpo.chunked_log_probs_and_entropy(out, weight, comp_ids, temperature, entropy=entropy)
    else:
        if temperature > 0 and temperature != 1.0:
            out = out / temperature
        logps = grpo.selective_log_softmax(out, comp_ids)
        if entropy:
            ent = grpo.token_entropy(out, grad=entropy_grad)
    full = logps.new_zeros(comp_ids.shape[0], rollout.completion_ids.shape[1])
    full[:, :width] = logps
    if ent is None:
        return full, None
    full_ent = torch.zeros(full.shape, dtype=torch.float32, device=full.device)
    full_ent[:, :width] = ent
    return full, full_ent


def _shared_prompt_outputs(model, weight: Optional[torch.Tensor], prompt_ids: torch.Tensor,
                           prompt_mask: torch.Tensor, comp_ids: torch.Tensor, comp_mask: torch.Tensor,
                           run_of_row: torch.Tensor) -> torch.Tensor:
    """Logits (or, given the head ``weight``, hidden states) predicting each completion token, (B, W, V or H):
    the (U, P) distinct left-padded prompts run once with a cache, then the (B, W) completions run on
    their prompt's cache (row b on prompt ``run_of_row[b]``). Gradients flow through the shared prompt
    keys/values as in a plain forward."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = _outputs(model, weight, 1, input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids,
                   cache=cache, use_cache=True)
    # Rows repeat their prompt: index_select, whose backward sums each prompt's rows in a fixed order.
    # Advanced indexing (``out[run_of_row]``, the cache's ``batch_select_indices``) would back-propagate
    # through index_put_(accumulate=True), which on CPU adds with atomics across threads: its rounding
    # then depends on thread timing, and runs (a resumed one against an uninterrupted one) drift apart.
    first = out.index_select(0, run_of_row)  # (B, 1, V or H): each prompt's last position predicts token 0
    if comp_ids.shape[1] == 1:
        return first
    _repeat_cache_rows(cache, run_of_row)
    prompt_mask = prompt_mask[run_of_row]
    mask = torch.cat([prompt_mask, comp_mask[:, :-1]], 1)
    position_ids = prompt_mask.sum(-1, keepdim=True) + torch.arange(comp_ids.shape[1] - 1, device=comp_ids.device)
    rest = _outputs(model, weight, input_ids=comp_ids[:, :-1], attention_mask=mask, position_ids=position_ids,
                    cache=cache, use_cache=True)  # (B, W - 1, V or H): completion token t predicts token t + 1
    return torch.cat([first, rest], 1)


def _repeat_cache_rows(cache, index: torch.Tensor) -> None:
    """The cache's batch rows ``index`` (with repeats), by ``index_select`` (see the caller)."""
    for layer in cache.layers:
        if layer.get_seq_length() > 0:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)


# what one more micro-batch costs (its extra forward/backward calls), counted in padded tokens
MICRO_BATCH_OVERHEAD_TOKENS = 256


def micro_batches(rollout: Rollout, max_tokens: int, max_rows: int = 256,
                  rows: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
    """Row index sets for the loss passes: the cheapest split into batches of at most ``max_tokens``.

    Rows (all, or ``rows``) are taken in order of completion length and cut into consecutive runs, choosing the cuts
    (dynamic programming) that minimise the padded work: a batch costs (its groups x its longest
    prompt) + (its rows x its longest completion) + ``MICRO_BATCH_OVERHEAD_TOKENS``, as each prompt runs
    once for its rows in the batch (see :func:`completion_logps`). Within a batch a group's rows are
    adjacent. A batch holds at most ``max_rows`` rows, which bounds the search.
    """
    n = rollout.n
    p_len = rollout.prompt_mask.sum(-1).tolist()
    c_len = rollout.completion_mask.sum(-1).tolist()
    order = sorted(range(len(c_len)) if rows is None else rows, key=lambda r: (c_len[r], r))
    best, cut = [0] + [float("inf")] * len(order), [0] * (len(order) + 1)  # best[j]: order[:j] split
    for j in range(1, len(order) + 1):
        groups, p_max, c_max = set(), 0, c_len[order[j - 1]]
        for i in range(j - 1, max(j - max_rows, 0) - 1, -1):  # the last batch is order[i:j]
            groups.add(order[i] // n)
            p_max = max(p_max, p_len[order[i]])
            cost = len(groups) * p_max + (j - i) * c_max
            if cost > max_tokens and i < j - 1:
                break
            if best[i] + cost + MICRO_BATCH_OVERHEAD_TOKENS < best[j]:
                best[j], cut[j] = best[i] + cost + MICRO_BATCH_OVERHEAD_TOKENS, i
    batches, j = [], len(order)
    while j > 0:
        batches.append(torch.tensor(sorted(order[cut[j]:j])))  # index order keeps a group's rows adjacent
        j = cut[j]
    return batches[::-1]


@dataclass
class LayerLoss:
    """One layer's rollout made ready for its loss passes (:func:`prepare_layer_loss`)."""

    rollout: Rollout
    advantages: torch.Tensor  # (B,) on the rollout's device
    mask: torch.Tensor  # (B, C) float: the completion tokens that count
    norm: float  # what the summed sequence terms are divided by (grpo.loss_normalizer of mask)
    batches: list[torch.Tensor]  # micro-batches of the rows that can move the loss
    weight: float = 1.0
    old_logps: Optional[torch.Tensor] = None  # (B, C) pi_old's, stored when num_iterations > 1
    ref_logps: Optional[torch.Tensor] = None  # (B, C) the reference's, stored when num_iterations > 1 and beta > 0
    token_mask: Optional[torch.Tensor] = None  # (B, C) the top-entropy tokens, when top_entropy_quantile < 1
    entropy_tokens: float = 1.0  # the tokens the entropy bonus averages over (counted, in the passes, token mask)
    stats: dict[str, float] = field(default_factory=dict)  # entropy and tokens of the no-grad pass


def _row_tokens(rollout: Rollout, rows: torch.Tensor, shared: bool) -> tuple[int, int]:
    """Prompt + completion tokens of ``rows``, unpadded: per row (as TRL counts ``num_tokens``), and as
    computed (``shared``: each group's prompt once, as :func:`completion_logps` runs it)."""
    prompts, completions = rollout.prompt_mask[rows].sum(-1), int(rollout.completion_mask[rows].sum().item())
    per_row = int(prompts.sum().item()) + completions
    if not shared:
        return per_row, per_row
    return per_row, int(prompts[_first_of_run(rows, rollout.n)].sum().item()) + completions


def _first_of_run(rows: torch.Tensor, n: int) -> torch.Tensor:
    """(b,) bool: the rows (of a rollout with ``n`` rows a group) that start a run of one group's rows,
    whose prompt a shared-prompt forward runs once."""
    groups = rows // n
    first = torch.ones_like(groups, dtype=torch.bool)
    first[1:] = groups[1:] != groups[:-1]
    return first


def prepare_layer_loss(model, rollout: Rollout, advantages: torch.Tensor, spec: LossSpec, *, weight: float = 1.0,
                       keep: Optional[torch.Tensor] = None,
                       ref_logps: Optional[Callable[[Rollout, torch.Tensor], torch.Tensor]] = None,
                       lockstep: Optional[Lockstep] = None) -> LayerLoss:
    """Which tokens count, the micro-batches, and (``spec.needs_first_pass``) one no-grad pass.

    advantages: (B,) per completion; keep: (B,) bool, completions that count (default all). With
    ``mask_truncated_completions`` the completions the budget cut off count for nothing. Completions
    that cannot move the loss are left out of every pass: those that do not count, and, without a KL
    term (beta = 0), those with zero advantage (every completion of a zero-variance group), whose loss
    and gradient are exactly zero (``spec.runs_every_row`` says when they are not); the normaliser
    still counts them. The no-grad pass stores pi_old's
    log-probs (num_iterations > 1; the reference's too when beta > 0) and makes the top-entropy token
    mask, whose quantile is taken over the counted tokens of the rows in the passes.
    """
    mask_all = rollout.completion_mask.float()
    # rewards, advantages and keep are made on the CPU; the rollout lives on the policy's device
    advantages = advantages.to(mask_all.device)
    if keep is not None:
        mask_all = mask_all * keep.to(mask_all.device).float().unsqueeze(-1)
    if spec.mask_truncated_completions:
        mask_all = mask_all * (~rollout.truncated.to(mask_all.device)).float().unsqueeze(-1)
    norm = spec.policy.aggregation.normalizer(mask_all, spec.max_completion_length)
    active = mask_all.sum(-1) > 0
    if not spec.runs_every_row:
        active &= advantages != 0
    batches = micro_batches(rollout, spec.micro_batch_tokens, rows=active.nonzero().squeeze(-1).tolist())
    layer = LayerLoss(rollout, advantages, mask_all, norm, batches, weight)
    counted = mask_all * active.float().unsqueeze(-1)
    layer.entropy_tokens = float(counted.sum().item())
    if not spec.needs_first_pass:
        return layer
    stored = spec.num_iterations > 1
    old = torch.zeros_like(mask_all) if stored else None
    ref = torch.zeros_like(mask_all) if stored and spec.policy.beta > 0 and ref_logps is not None else None
    ent = torch.zeros_like(mask_all)
    tokens, computed = 0, 0
    with torch.no_grad():
        for rows, mask in _passes(layer, lockstep):
            logp, row_ent = completion_logps_and_entropy(model, rollout, rows, spec.temperature,
                                                         share_prompts=lockstep is None)
            if not mask.any():  # a zero-weight pass to stay in step with the other ranks
                continue
            ent[rows] = row_ent
            n_rows, n_computed = _row_tokens(rollout, rows, lockstep is None)
            tokens, computed = tokens + n_rows, computed + n_computed
            if old is not None:
                old[rows] = logp
            if ref is not None:
                ref[rows] = ref_logps(rollout, rows)
    layer.old_logps, layer.ref_logps = old, ref
    if spec.top_entropy_quantile < 1.0:
        layer.token_mask = grpo.top_entropy_mask(ent, counted, spec.top_entropy_quantile)
        layer.entropy_tokens = float(layer.token_mask.sum().item())
    layer.stats = {"entropy": grpo.masked_mean(ent, counted), "loss_tokens": float(tokens),
                   "loss_tokens_computed": float(computed)}
    return layer


def _passes(layer: LayerLoss, lockstep: Optional[Lockstep]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, mask) of each micro-batch; under ``lockstep`` padded with zero-mask passes on row 0."""
    n = lockstep(len(layer.batches)) if lockstep else len(layer.batches)
    for i in range(n):
        if i < len(layer.batches):
            rows = layer.batches[i]
            yield rows, layer.mask[rows]
        else:
            rows = torch.tensor([0])
            yield rows, torch.zeros_like(layer.mask[rows])


def loss_pass(model, layer: LayerLoss, spec: LossSpec, backward: Callable[[torch.Tensor], None], *,
              ref_logps: Optional[Callable[[Rollout, torch.Tensor], torch.Tensor]] = None,
              entropy_coef: float = 0.0, lockstep: Optional[Lockstep] = None) -> dict[str, float]:
    """Accumulate ``layer.weight`` x the layer's GRPO loss into the gradients, micro-batch by micro-batch.

    ``ref_logps(rollout, rows)`` gives reference log-probs when beta > 0 (unless stored);
    ``entropy_coef`` (the coefficient this step applies) subtracts that times the layer's mean token
    entropy (``grpo.entropy_bonus``). Returns the loss, the mean KL and the clip fractions over the
    counted tokens (``clip_low``: ratio below 1 - epsilon with A < 0; ``clip_high``: above
    1 + epsilon_high with A > 0, or cispo's capped weights; ``clip_region``: either), the share of
    counted tokens the off-policy mask dropped (``off_policy_masked``, with the mask), the tokens run
    (``loss_tokens`` per row, ``loss_tokens_computed`` with each group's prompt once), and, unless the
    no-grad pass measured it, the mean token entropy of the counted tokens run.
    """
    total_loss, kl_sum, low_sum, high_sum, ent_sum, ent_n, tokens, computed = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0
    masked_sum = 0.0
    gap = dict.fromkeys(("abs_diff", "kl", "ratio_max", "tokens", "rows", "is_sum", "is_capped"), 0.0)
    measure_entropy = "entropy" not in layer.stats
    bonus = entropy_coef != 0
    for rows, mask in _passes(layer, lockstep):
        logp, ent = completion_logps_and_entropy(model, layer.rollout, rows, spec.temperature,
                                                 share_prompts=lockstep is None,
                                                 entropy=measure_entropy or bonus, entropy_grad=bonus)
        old = None if layer.old_logps is None else layer.old_logps[rows]
        if layer.ref_logps is not None:
            ref = layer.ref_logps[rows]
        else:
            ref = ref_logps(layer.rollout, rows) if (spec.policy.beta > 0 and ref_logps is not None) else None
        token_mask = None if layer.token_mask is None else layer.token_mask[rows]
        is_weights = None
        if layer.rollout.sampling_logps is not None:  # pi_old (stored, or this pass's) against the sampler's
            sampled, trainer_old = layer.rollout.sampling_logps[rows], logp.detach() if old is None else old
            for k, v in grpo.rollout_gap(trainer_old, sampled, mask).items():
                gap[k] = max(gap[k], v.item()) if k == "ratio_max" else gap[k] + v.item()
            if spec.rollout_is is not None:
                is_weights, capped = grpo.rollout_is_weights(trainer_old, sampled, mask, spec.rollout_is,
                                                             spec.rollout_is_cap)
                gap["is_sum"] += (is_weights * mask).sum().item()
                gap["is_capped"] += (capped.float() * mask).sum().item()
        out = spec.policy(logp, layer.advantages[rows], mask, old_logp=old, ref_logp=ref, token_mask=token_mask,
                          is_weights=is_weights)
        aggregation = spec.policy.aggregation
        norm = aggregation.pass_normalizer(mask, layer.norm, len(layer.batches))
        loss = aggregation.sequence_terms(out.loss, mask).sum() / norm
        if bonus:
            kept = mask if token_mask is None else mask * token_mask
            loss = loss - entropy_coef * grpo.entropy_bonus(ent, kept, layer.entropy_tokens)
        backward(layer.weight * loss)
        masked_sum += (out.masked.float() * mask).sum().item()
        total_loss += loss.item()
        kl_sum += (out.kl * mask).sum().item()
        low_sum += (out.low.float() * mask).sum().item()
        high_sum += (out.high.float() * mask).sum().item()
        if mask.any():
            n_rows, n_computed = _row_tokens(layer.rollout, rows, lockstep is None)
            tokens, computed = tokens + n_rows, computed + n_computed
            if measure_entropy:
                ent_sum += (ent.detach() * mask).sum().item()
                ent_n += mask.sum().item()
    n = max(layer.mask.sum().item(), 1.0)  # skipped completions count as unclipped, zero-KL tokens
    stats = {"loss": total_loss, "kl": kl_sum / n, "clip_low": low_sum / n, "clip_high": high_sum / n,
             "clip_region": (low_sum + high_sum) / n, "loss_tokens": float(tokens),
             "loss_tokens_computed": float(computed)}
    if measure_entropy:
        stats["entropy"] = ent_sum / ent_n if ent_n else 0.0
    if spec.policy.off_policy_threshold is not None:
        stats["off_policy_masked"] = masked_sum / n
    if layer.rollout.sampling_logps is not None:
        stats.update(gap_metrics(gap, spec.rollout_is is not None))
    return stats


def gap_metrics(gap: dict[str, float], weighted: bool) -> dict[str, float]:
    """The sampler/trainer gap over the tokens of a loss pass (summed :func:`grpo.rollout_gap` parts):
    ``rollout_logp_abs_diff`` (mean |delta log p| per token), ``rollout_kl`` (mean per completion of its
    summed k3 KL(sampler || trainer)), ``rollout_ratio_max`` (1 when no token was run); with ``weighted``
    (grpo.rollout_is) the mean importance weight and the share of tokens whose ratio was above the cap
    (``rollout_is_mean``, ``rollout_is_capped``)."""
    tokens, rows = max(gap["tokens"], 1.0), max(gap["rows"], 1.0)
    out = {"rollout_logp_abs_diff": gap["abs_diff"] / tokens, "rollout_kl": gap["kl"] / rows,
           "rollout_ratio_max": gap["ratio_max"] if gap["tokens"] else 1.0}
    if weighted:
        out.update(rollout_is_mean=gap["is_sum"] / tokens if gap["tokens"] else 1.0,
                   rollout_is_capped=gap["is_capped"] / tokens)
    return out


# the loss-pass stats that add up over passes (the others are averaged)
TOKEN_COUNTS = ("loss_tokens", "loss_tokens_computed")
