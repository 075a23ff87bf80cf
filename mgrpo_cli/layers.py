"""One GRPO layer as a pipeline (rollout -> grade -> advantages -> loss), and what links layers.

Every layer of MGRPO runs :func:`run_layer` on its own inputs: layer 1 on the questions with G
samples each, layer 2 on (question, a layer-1 response, a guiding phrase) with H samples each, and
a layer k >= 3 on the layer before it the same way. The only layer-specific code is choosing which
responses go on (:func:`select_responses`), building the next inputs (:func:`next_inputs`) and the
optional improvement reward (:func:`layer_rewards`). :func:`solve` is the two-pass (t1, t2) greedy
evaluation shared by periodic validation and ``mgrpo eval``.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from mgrpo_cli import grpo
from mgrpo_cli.prompts import PromptRenderer, Turn
from mgrpo_cli.rollout import Rollout, RolloutEngine

SELECT_MODES = ("all", "wrong", "sample")


@dataclass(frozen=True)
class LayerInput:
    """What one group of a layer answers: problem ``problem`` after ``turns`` earlier attempts."""

    problem: int  # index into the step's problems
    turns: tuple[Turn, ...] = ()
    prev_correct: Optional[bool] = None  # correctness of the response being corrected (layers >= 2)


@dataclass
class LayerResult:
    inputs: list[LayerInput]
    rollout: Rollout
    correct: list[Optional[bool]]  # per completion
    rewards: torch.Tensor  # (groups, n) float, NaN = ungradable
    advantages: torch.Tensor  # (groups, n)
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- linking layers (pure functions)

def select_responses(correct: Sequence[Sequence[Optional[bool]]], mode: str, k: int,
                     rng: random.Random) -> list[tuple[int, int]]:
    """Which (group, response) pairs of a layer go on to the next layer.

    ``all``: every response; ``wrong``: the wrong ones; ``sample``: k per group, taking one right and
    one wrong first when the group has both (so the next layer sees fixes and confirmations).
    """
    if mode not in SELECT_MODES:
        raise ValueError(f"layer.select: expected one of {SELECT_MODES}, got {mode!r}")
    chosen: list[tuple[int, int]] = []
    for g, row in enumerate(correct):
        idx = list(range(len(row)))
        if mode == "all":
            picked = idx
        elif mode == "wrong":
            picked = [i for i in idx if row[i] is False]
        else:
            right = [i for i in idx if row[i] is True]
            wrong = [i for i in idx if row[i] is False]
            picked = []
            if right and wrong and k >= 2:
                picked = [rng.choice(right), rng.choice(wrong)]
            rest = [i for i in idx if i not in picked]
            rng.shuffle(rest)
            picked = sorted(picked + rest[: max(k - len(picked), 0)])
        chosen += [(g, i) for i in picked]
    return chosen


def next_inputs(result_inputs: Sequence[LayerInput], texts: Sequence[str], correct: Sequence[Optional[bool]],
                n: int, chosen: Sequence[tuple[int, int]], phrases: Sequence[str],
                rng: random.Random) -> list[LayerInput]:
    """Inputs of the next layer: each chosen response appended to its group's turns with a phrase."""
    out = []
    for g, i in chosen:
        src, row = result_inputs[g], g * n + i
        out.append(LayerInput(src.problem, src.turns + ((texts[row], rng.choice(list(phrases))),),
                              correct[row]))
    return out


def layer_rewards(base: torch.Tensor, correct: Sequence[Optional[bool]], prev: Sequence[Optional[bool]],
                  mode: str, bonus: float) -> torch.Tensor:
    """Rewards of a correction layer. ``correct``: the base reward; ``improvement``: plus ``bonus``
    for wrong->right and minus ``bonus`` for right->wrong (SCoRe-style). base/correct/prev are per completion."""
    if mode == "correct":
        return base
    if mode != "improvement":
        raise ValueError(f"layer.reward: expected correct|improvement, got {mode!r}")
    shaped = base.clone()
    for j, (c, p) in enumerate(zip(correct, prev)):
        if c is not None and p is not None:
            shaped[j] += bonus * (int(c) - int(p))
    return shaped


def transitions(prev: Sequence[Optional[bool]], now: Sequence[Optional[bool]]) -> dict[str, float]:
    """wrong->right and right->wrong shares over pairs (None counts as wrong)."""
    n = max(len(now), 1)
    i2c = sum(1 for p, c in zip(prev, now) if not p and c)
    c2i = sum(1 for p, c in zip(prev, now) if p and not c)
    return {"wrong_to_right": i2c / n, "right_to_wrong": c2i / n}


# ---------------------------------------------------------------- the layer pipeline

def completion_logps(model, rollout: Rollout, rows: torch.Tensor, temperature: float,
                     share_prompts: bool = True) -> torch.Tensor:
    """Per-token log-probs of the completions of ``rows`` under ``model``: (len(rows), C).

    Rows of a group share their prompt. Where ``rows`` hold runs of one group (as :func:`micro_batches`
    makes them), each prompt runs once and its key/value cache serves the run's completions
    (:func:`_shared_prompt_logits`); otherwise prompt + completion run as one sequence per row. Both
    give the same log-probs and gradients, up to float rounding. ``share_prompts=False`` always makes
    one forward call (sharded training needs the same number of calls on every rank).
    """
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
        logits = _shared_prompt_logits(model, prompt_ids[first_of_run], prompt_mask[first_of_run], comp_ids,
                                       comp_mask, run_of_row=first_of_run.cumsum(0) - 1)
    else:
        ids = torch.cat([prompt_ids, comp_ids], 1)
        mask = torch.cat([prompt_mask, comp_mask], 1)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                       logits_to_keep=width + 1).logits[:, :-1]  # (b, width, V) predicting comp tokens
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logps = grpo.selective_log_softmax(logits, comp_ids)
    full = logps.new_zeros(comp_ids.shape[0], rollout.completion_ids.shape[1])
    full[:, :width] = logps
    return full


def _shared_prompt_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, comp_ids: torch.Tensor,
                          comp_mask: torch.Tensor, run_of_row: torch.Tensor) -> torch.Tensor:
    """Logits predicting each completion token, (B, W, V): the (U, P) distinct left-padded prompts run
    once with a cache, then the (B, W) completions run on their prompt's cache (row b on prompt
    ``run_of_row[b]``). Gradients flow through the shared prompt keys/values as in a plain forward."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    position_ids = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids, cache=cache,
                use_cache=True, logits_to_keep=1)
    first = out.logits[run_of_row]  # (B, 1, V): each prompt's last position predicts completion token 0
    if comp_ids.shape[1] == 1:
        return first
    cache.batch_select_indices(run_of_row)
    prompt_mask = prompt_mask[run_of_row]
    mask = torch.cat([prompt_mask, comp_mask[:, :-1]], 1)
    position_ids = prompt_mask.sum(-1, keepdim=True) + torch.arange(comp_ids.shape[1] - 1, device=comp_ids.device)
    rest = model(input_ids=comp_ids[:, :-1], attention_mask=mask, position_ids=position_ids, cache=cache,
                 use_cache=True).logits  # (B, W - 1, V): completion token t predicts token t + 1
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


@dataclass
class LossSettings:
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    std_eps: float = 1e-4
    temperature: float = 1.0
    micro_batch_tokens: int = 65536
    max_completion_length: int = 48
    # sharded training: n -> the largest n of any rank, so every rank runs as many forward/backward
    # passes (each is a collective there), each one forward call; the extra passes carry zero weight
    lockstep: Optional[Callable[[int], int]] = None


def policy_loss_backward(model, rollout: Rollout, advantages: torch.Tensor, settings: LossSettings,
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
    norm = grpo.loss_normalizer(mask_all, settings.loss_type, settings.max_completion_length)
    eps_high = settings.epsilon if settings.epsilon_high is None else settings.epsilon_high
    active = mask_all.sum(-1) > 0
    if settings.beta == 0:
        active &= advantages != 0
    total_loss, kl_sum, clip_sum = 0.0, 0.0, 0.0
    tokens = mask_all.sum().item()  # skipped completions count as unclipped, zero-KL tokens
    batches = micro_batches(rollout, settings.micro_batch_tokens, rows=active.nonzero().squeeze(-1).tolist())
    passes = settings.lockstep(len(batches)) if settings.lockstep else len(batches)
    for i in range(passes):
        rows = batches[i] if i < len(batches) else torch.tensor([0])  # a zero-weight pass to stay in step
        mask = mask_all[rows] if i < len(batches) else torch.zeros_like(mask_all[rows])
        logp = completion_logps(model, rollout, rows, settings.temperature, share_prompts=settings.lockstep is None)
        ref = ref_logps(rollout, rows) if (settings.beta > 0 and ref_logps is not None) else None
        per_token, kl, clipped = grpo.grpo_token_loss(
            logp, advantages[rows], ref_logp=ref, beta=settings.beta, eps_low=settings.epsilon,
            eps_high=eps_high)
        loss = grpo.sequence_terms(per_token, mask, settings.loss_type).sum() / norm
        backward(weight * loss)
        total_loss += loss.item()
        kl_sum += (kl * mask).sum().item()
        clip_sum += (clipped.float() * mask).sum().item()
    tokens = max(tokens, 1.0)
    return {"loss": total_loss, "kl": kl_sum / tokens, "clip_fraction": clip_sum / tokens}


def run_layer(engine: RolloutEngine, renderer: PromptRenderer, reward_fn, questions: Sequence[str],
              golds: Sequence[str], inputs: list[LayerInput], *, n: int, max_new_tokens: int,
              temperature: float, top_p: float, settings: LossSettings, reward_mode: str = "correct",
              improvement_bonus: float = 1.0) -> LayerResult:
    """Rollout -> grade -> group advantages for one layer (the loss is applied by the caller)."""
    prompts = [renderer.render(questions[x.problem], x.turns) for x in inputs]
    rollout = engine.generate(prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    row_golds = [golds[x.problem] for x in inputs for _ in range(n)]
    scored = reward_fn(rollout.texts, row_golds)
    base = torch.tensor([float("nan") if r is None else r for r in scored.rewards])
    prev = [x.prev_correct for x in inputs for _ in range(n)]
    rewards = layer_rewards(base, scored.correct, prev, reward_mode, improvement_bonus).view(-1, n)
    advantages = grpo.group_advantages(rewards, settings.scale_rewards, settings.std_eps)
    valid = ~torch.isnan(rewards)
    correct = scored.correct
    metrics = {
        "reward_mean": rewards[valid].mean().item() if valid.any() else 0.0,
        "reward_std": rewards[valid].std().item() if valid.sum() > 1 else 0.0,
        "accuracy": sum(1 for c in correct if c) / max(len(correct), 1),
        "zero_variance_groups": grpo.zero_variance_share(rewards),
        "completion_length": rollout.lengths.float().mean().item(),
        "ungradable": float((~valid).sum().item()),
        "groups": float(len(inputs)),
    }
    if inputs and inputs[0].prev_correct is not None:
        metrics.update(transitions(prev, correct))
    return LayerResult(inputs, rollout, list(correct), rewards, advantages, metrics)


# ---------------------------------------------------------------- two-pass evaluation

@dataclass
class Solved:
    """Greedy (or sampled) answers of every problem: t1 and, when two-pass, t2 on t1."""

    t1_texts: list[list[str]]  # per problem, n completions
    t1_correct: list[list[Optional[bool]]]
    t2_texts: Optional[list[str]] = None  # per problem, the correction of the first t1 completion
    t2_correct: Optional[list[Optional[bool]]] = None
    prompts: list[str] = field(default_factory=list)
    t2_prompts: Optional[list[str]] = None


def solve(engine: RolloutEngine, renderer: PromptRenderer, grader_correct, questions: Sequence[str],
          golds: Sequence[str], *, max_new_tokens: int, batch_size: int = 64, n: int = 1,
          temperature: float = 0.0, phrase: Optional[str] = None, progress: Optional[Callable[[int], None]] = None,
          max_new_tokens_t2: Optional[int] = None) -> Solved:
    """Answer every question (t1) and, when ``phrase`` is given, correct the first answer once (t2).

    Prompts are sorted by length and generated ``batch_size`` at a time; ``grader_correct`` is the
    grader's ``correct(completions, golds)``.
    """
    def generate_all(prompts: list[str], k: int, temp: float, max_new: int) -> list[list[str]]:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        texts: list[Optional[list[str]]] = [None] * len(prompts)
        per_batch = max(1, batch_size // k)
        for s in range(0, len(order), per_batch):
            idx = order[s:s + per_batch]
            ro = engine.generate([prompts[i] for i in idx], n=k, max_new_tokens=max_new, temperature=temp)
            for j, i in enumerate(idx):
                texts[i] = ro.texts[j * k:(j + 1) * k]
            if progress:
                progress(len(idx))
        return texts  # type: ignore[return-value]

    prompts = [renderer.render(q) for q in questions]
    t1 = generate_all(prompts, n, temperature if n > 1 else 0.0, max_new_tokens)
    flat = [t for row in t1 for t in row]
    flat_ok = grader_correct(flat, [g for g in golds for _ in range(n)])
    t1_correct = [flat_ok[i * n:(i + 1) * n] for i in range(len(questions))]
    solved = Solved(t1, t1_correct, prompts=prompts)
    if phrase is not None:
        t2_prompts = [renderer.render(q, ((row[0], phrase),)) for q, row in zip(questions, t1)]
        t2 = [row[0] for row in generate_all(t2_prompts, 1, 0.0, max_new_tokens_t2 or max_new_tokens)]
        solved.t2_texts, solved.t2_prompts = t2, t2_prompts
        solved.t2_correct = grader_correct(t2, list(golds))
    return solved
