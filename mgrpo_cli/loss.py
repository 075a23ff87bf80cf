"""The GRPO loss of a layer's rollout, applied to the gradients micro-batch by micro-batch.

:func:`completion_logps` gives per-token log-probs of completions under a model (each group's prompt
runs once and its key/value cache serves the group's completions); :func:`micro_batches` splits a
rollout's rows into the cheapest batches under a token budget; :func:`policy_loss_backward`
accumulates ``weight`` x the layer's GRPO loss (``grpo.grpo_token_loss`` aggregated as
:class:`LossSpec` says) into the gradients. Every layer of MGRPO goes through these functions.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from mgrpo_cli import grpo
from mgrpo_cli.rollout import Rollout


@dataclass(frozen=True)
class LossSpec:
    """How a rollout becomes a loss: the GRPO objective's constants, chosen once by the build layer."""

    beta: float  # KL weight (k3 estimator against the reference policy)
    epsilon: float  # clip range below 1
    epsilon_high: float  # clip range above 1
    loss_type: str  # grpo | dapo | dr_grpo (grpo.sequence_terms / grpo.loss_normalizer)
    scale_rewards: str  # group | batch | none (grpo.group_advantages)
    std_eps: float
    temperature: float  # sampling temperature; log-probs are taken at the same temperature
    top_p: float
    micro_batch_tokens: int
    max_completion_length: int  # dr_grpo's constant normaliser
    # sharded training: n -> the largest n of any rank, so every rank runs as many forward/backward
    # passes (each is a collective there), each one forward call; the extra passes carry zero weight
    lockstep: Optional[Callable[[int], int]] = None


# vocabularies at least this large take the chunked log-prob path (:func:`completion_logps`): at
# Qwen2.5's 151,936 the whole logits of a 16k-token micro-batch are 4.6 GiB in bf16 plus 9.3 GiB in
# float32; below it (the tiny model's 260) the logits are small and one matmul is cheaper than two
CHUNKED_VOCAB = 32768


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_weight(model) -> Optional[torch.Tensor]:
    """The (V, H) lm_head weight when the logits are ``decoder(x).last_hidden_state @ weight.T`` and
    nothing else (a plain bias-free ``nn.Linear`` head, not wrapped by an adapter, not sharded), else None."""
    base = _base(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None or not hasattr(base, "model"):
        return None
    if any(type(p).__name__ == "DTensor" for p in base.parameters()):
        return None  # sharded: the root module's hooks gather the head, calling the decoder alone skips them
    return head.weight


def _outputs(model, weight: Optional[torch.Tensor], keep: int = 0, **kw) -> torch.Tensor:
    """The model's logits of the last ``keep`` positions (all for 0), or, given the head ``weight``,
    its decoder's last hidden states there (the chunked path applies the head itself)."""
    if weight is None:
        return model(**kw, logits_to_keep=keep).logits
    hidden = _base(model).model(**kw).last_hidden_state
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
    weight = output_weight(model)
    if chunked is None:
        chunked = weight is not None and weight.shape[0] >= CHUNKED_VOCAB
    elif chunked and weight is None:
        raise ValueError("completion_logps: chunked=True needs a plain bias-free lm_head (no adapter, unsharded)")
    weight = weight if chunked else None
    prompt_ids, prompt_mask = rollout.prompt_ids[rows], rollout.prompt_mask[rows]
    comp_ids, comp_mask = rollout.completion_ids[rows], rollout.completion_mask[rows]
    # trim padding shared by every row of this micro-batch
    left = int((prompt_mask.sum(0) == 0).sum().item())
    width = int(comp_mask.sum(-1).max().item())
    prompt_ids, prompt_mask = prompt_ids[:, left:], prompt_mask[:, left:]
    comp_ids, comp_mask = comp_ids[:, :width], comp_mask[:, :width]
    group = rows // rollout.n
    first_of_run = torch.ones_like(group, dtype=torch.bool)
    first_of_run[1:] = group[1:] != group[:-1]
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
    if weight is not None:
        logps = grpo.chunked_selective_log_softmax(out, weight, comp_ids, temperature)
    else:
        if temperature > 0 and temperature != 1.0:
            out = out / temperature
        logps = grpo.selective_log_softmax(out, comp_ids)
    full = logps.new_zeros(comp_ids.shape[0], rollout.completion_ids.shape[1])
    full[:, :width] = logps
    return full


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
    first = out[run_of_row]  # (B, 1, V or H): each prompt's last position predicts completion token 0
    if comp_ids.shape[1] == 1:
        return first
    cache.batch_select_indices(run_of_row)
    prompt_mask = prompt_mask[run_of_row]
    mask = torch.cat([prompt_mask, comp_mask[:, :-1]], 1)
    position_ids = prompt_mask.sum(-1, keepdim=True) + torch.arange(comp_ids.shape[1] - 1, device=comp_ids.device)
    rest = _outputs(model, weight, input_ids=comp_ids[:, :-1], attention_mask=mask, position_ids=position_ids,
                    cache=cache, use_cache=True)  # (B, W - 1, V or H): completion token t predicts token t + 1
    return torch.cat([first, rest], 1)


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


def policy_loss_backward(model, rollout: Rollout, advantages: torch.Tensor, spec: LossSpec,
                         backward: Callable[[torch.Tensor], None], *, weight: float = 1.0,
                         keep: Optional[torch.Tensor] = None,
                         ref_logps: Optional[Callable[[Rollout, torch.Tensor], torch.Tensor]] = None) -> dict[str, float]:
    """Accumulate ``weight`` x the GRPO loss of ``rollout`` into the gradients, micro-batch by micro-batch.

    advantages: (B,) per completion; keep: (B,) bool, completions that count (default all).
    ``ref_logps(rollout, rows)`` gives reference log-probs when beta > 0. Returns loss/KL/clip stats.

    Completions that cannot move the loss are not run: those outside ``keep``, and, without a KL
    term (beta = 0), those with zero advantage (every completion of a zero-variance group), whose
    loss and gradient are exactly zero. The normaliser still counts them, so the result is the same.
    """
    mask_all = rollout.completion_mask.float()
    # rewards, advantages and keep are made on the CPU; the rollout lives on the policy's device
    advantages = advantages.to(mask_all.device)
    if keep is not None:
        mask_all = mask_all * keep.to(mask_all.device).float().unsqueeze(-1)
    norm = grpo.loss_normalizer(mask_all, spec.loss_type, spec.max_completion_length)
    active = mask_all.sum(-1) > 0
    if spec.beta == 0:
        active &= advantages != 0
    total_loss, kl_sum, clip_sum = 0.0, 0.0, 0.0
    tokens = mask_all.sum().item()  # skipped completions count as unclipped, zero-KL tokens
    batches = micro_batches(rollout, spec.micro_batch_tokens, rows=active.nonzero().squeeze(-1).tolist())
    passes = spec.lockstep(len(batches)) if spec.lockstep else len(batches)
    for i in range(passes):
        rows = batches[i] if i < len(batches) else torch.tensor([0])  # a zero-weight pass to stay in step
        mask = mask_all[rows] if i < len(batches) else torch.zeros_like(mask_all[rows])
        logp = completion_logps(model, rollout, rows, spec.temperature, share_prompts=spec.lockstep is None)
        ref = ref_logps(rollout, rows) if (spec.beta > 0 and ref_logps is not None) else None
        per_token, kl, clipped = grpo.grpo_token_loss(
            logp, advantages[rows], ref_logp=ref, beta=spec.beta, eps_low=spec.epsilon, eps_high=spec.epsilon_high)
        loss = grpo.sequence_terms(per_token, mask, spec.loss_type).sum() / norm
        backward(weight * loss)
        total_loss += loss.item()
        kl_sum += (kl * mask).sum().item()
        clip_sum += (clipped.float() * mask).sum().item()
    tokens = max(tokens, 1.0)
    return {"loss": total_loss, "kl": kl_sum / tokens, "clip_fraction": clip_sum / tokens}
