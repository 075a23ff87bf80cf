"""One GRPO layer as a pipeline (rollout -> grade -> advantages), and what links layers.

Every layer of MGRPO runs :func:`run_layer` on its own inputs with its own :class:`LayerSpec`: layer 1
on the questions with G samples each, layer 2 on (question, a layer-1 response, a guiding phrase)
with H samples each, and a layer k >= 3 on the layer before it the same way; the rollout samples as
its ``Sampling`` says and the advantage estimator (``advantage.Advantages``) scores the groups; the
loss of every layer is applied by ``loss.prepare_layer_loss`` and ``loss.loss_pass``. The only
layer-specific code is data: which responses go on (a :class:`SelectionRule` of
:data:`SELECTION_RULES`, named by ``layer.select``), turned into the next layer's inputs and spares
by :func:`link`, and the optional improvement reward (:func:`layer_rewards`).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from mgrpo_cli.algo import advantage, grpo
from mgrpo_cli.data.problems import Problem
from mgrpo_cli.grading.rewards import overlong_penalty
from mgrpo_cli.rollout.engine import Rollout, RolloutEngine, Sampling, concat_rollouts
from mgrpo_cli.rollout.prompts import PromptRenderer, Turn


@dataclass(frozen=True)
class LayerSpec:
    """What one layer does (built once per depth by the build layer)."""

    depth: int  # 1 = GRPO on the questions; 2+ = corrections of the layer before
    n: int  # samples per input: G (layer 1) or H
    max_new_tokens: int
    reward: str  # correct | improvement (+bonus wrong->right, -bonus right->wrong)
    improvement_bonus: float
    weight: float  # the layer's loss weight (lambda for corrections)
    keep_successful: bool  # only correct completions enter the loss ("dynamic verification")
    select: Optional[str]  # which responses go on to the next layer: a SELECTION_RULES name; None = last layer
    k: int  # responses per input sent on when select == sample
    phrases: tuple[str, ...]  # guiding phrases appended to the responses sent on
    # DAPO's dynamic sampling: zero-variance groups are dropped and more inputs drawn, up to this many rollouts
    dynamic_sampling: bool
    max_sampling_rounds: int
    # DAPO's soft overlong punishment inside the last overlong_buffer_len tokens of max_new_tokens; None = off
    overlong_buffer_len: Optional[int]
    overlong_penalty_factor: float


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
    keep: Optional[torch.Tensor] = None  # (groups * n,) bool: completions that enter the loss; None = all
    metrics: dict[str, float] = field(default_factory=dict)
    # GDPO (normalize_then_sum): (groups, n, K) reward-term values and their (K,) weights; None = not used
    terms: Optional[torch.Tensor] = None
    term_weights: Optional[torch.Tensor] = None
    prompts_cut: int = 0  # prompts whose earlier answers were shortened to fit the correction prompt budget
    overlong: Optional[torch.Tensor] = None  # (groups * n,) the overlong penalty in the rewards; None = off


def first_inputs(n_problems: int) -> list[LayerInput]:
    """Layer 1's inputs: every problem of the step, no earlier turns."""
    return [LayerInput(i) for i in range(n_problems)]


# ---------------------------------------------------------------- linking layers (pure functions)

@dataclass(frozen=True)
class SelectionRule:
    """A ``layer.select`` value: ``pick(correct, k, rng)`` gives the responses of one group (its
    per-response correctness) that go on to the next layer; ``spare(correct)`` says whether a response
    not picked may still go on as a spare (the next layer's dynamic sampling draws them)."""

    pick: Callable[[Sequence[Optional[bool]], int, random.Random], list[int]]
    spare: Callable[[Optional[bool]], bool]


def _pick_all(row: Sequence[Optional[bool]], k: int, rng: random.Random) -> list[int]:
    return list(range(len(row)))


def _pick_wrong(row: Sequence[Optional[bool]], k: int, rng: random.Random) -> list[int]:
    return [i for i in range(len(row)) if row[i] is False]


def _pick_sample(row: Sequence[Optional[bool]], k: int, rng: random.Random) -> list[int]:
    """k responses, taking one right and one wrong first when the group has both (so the next layer
    sees fixes and confirmations), the rest at random."""
    idx = list(range(len(row)))
    right = [i for i in idx if row[i] is True]
    wrong = [i for i in idx if row[i] is False]
    picked = []
    if right and wrong and k >= 2:
        picked = [rng.choice(right), rng.choice(wrong)]
    rest = [i for i in idx if i not in picked]
    rng.shuffle(rest)
    return sorted(picked + rest[: max(k - len(picked), 0)])


def _any(correct: Optional[bool]) -> bool:
    return True


def _is_wrong(correct: Optional[bool]) -> bool:
    return correct is False


# layer.select -> its rule (the schema's Select enum lists the same names)
SELECTION_RULES: dict[str, SelectionRule] = {
    "all": SelectionRule(_pick_all, _any),
    "wrong": SelectionRule(_pick_wrong, _is_wrong),
    "sample": SelectionRule(_pick_sample, _any),
}


def select_responses(correct: Sequence[Sequence[Optional[bool]]], mode: str, k: int,
                     rng: random.Random) -> list[tuple[int, int]]:
    """Which (group, response) pairs of a layer go on to the next layer: rule ``mode`` of
    :data:`SELECTION_RULES` on each group (``all``: every response; ``wrong``: the wrong ones;
    ``sample``: k per group, one right and one wrong first when the group has both)."""
    pick = SELECTION_RULES[mode].pick
    return [(g, i) for g, row in enumerate(correct) for i in pick(row, k, rng)]


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
    shaped = base.clone()
    for j, (c, p) in enumerate(zip(correct, prev, strict=True)):
        if c is not None and p is not None:
            shaped[j] += bonus * (int(c) - int(p))
    return shaped


def transitions(prev: Sequence[Optional[bool]], now: Sequence[Optional[bool]]) -> dict[str, float]:
    """wrong->right and right->wrong shares over pairs (None counts as wrong)."""
    n = max(len(now), 1)
    i2c = sum(1 for p, c in zip(prev, now, strict=True) if not p and c)
    c2i = sum(1 for p, c in zip(prev, now, strict=True) if p and not c)
    return {"wrong_to_right": i2c / n, "right_to_wrong": c2i / n}


def chosen_after(result: LayerResult, spec: LayerSpec, rng: random.Random) -> list[tuple[int, int]]:
    """The (group, response) pairs of ``result`` that ``spec.select`` sends to the next layer."""
    if spec.select is None:
        return []
    n = result.rollout.n
    table = [result.correct[i * n:(i + 1) * n] for i in range(len(result.inputs))]
    return select_responses(table, spec.select, spec.k, rng)


def inputs_after(result: LayerResult, spec: LayerSpec, rng: random.Random,
                 chosen: Optional[Sequence[tuple[int, int]]] = None) -> list[LayerInput]:
    """The next layer's inputs: the responses ``spec.select`` picks (or ``chosen``), each with a guiding phrase."""
    if spec.select is None:
        return []
    chosen = chosen_after(result, spec, rng) if chosen is None else chosen
    return next_inputs(result.inputs, result.rollout.texts, result.correct, result.rollout.n, chosen, spec.phrases, rng)


def row_fields(problems: Sequence[Problem], inputs: Sequence[LayerInput], n: int, depth: int) -> dict[str, list]:
    """What an own reward function gets besides completions and golds: one list per field, a value per
    completion: the problem's ``question``, ``id``, ``solution``, the ``layer`` depth, the ``turns``
    before the completion, and the problem's other fields (``Problem.meta``, then ``Problem.extra``:
    the data set row's unmapped columns), the named ones above winning over a field of the same name."""
    rows = [(problems[x.problem], x) for x in inputs for _ in range(n)]
    fields: dict[str, list] = {}
    extra_names = dict.fromkeys(k for p, _ in rows for k in (*p.extra, *p.meta))
    for name in extra_names:
        fields[name] = [p.meta[name] if name in p.meta else p.extra.get(name) for p, _ in rows]
    fields.update(question=[p.question for p, _ in rows], id=[p.id for p, _ in rows],
                  solution=[p.solution for p, _ in rows], layer=[depth] * len(rows),
                  turns=[x.turns for _, x in rows])
    return fields


def run_layer(engine: RolloutEngine, renderer: PromptRenderer, reward_fn, problems: Sequence[Problem],
              inputs: list[LayerInput], spec: LayerSpec, sampling: Sampling,
              advantages: advantage.Advantages) -> LayerResult:
    """Rollout (as ``sampling`` says) -> grade -> group advantages (``advantages``) for one layer (the
    loss is applied by the caller)."""
    n = spec.n
    fitted = [renderer.fit(problems[x.problem].question, x.turns) for x in inputs]
    prompts = [text for text, _ in fitted]
    rollout = engine.generate(prompts, n=n, max_new_tokens=spec.max_new_tokens, **sampling.kwargs())
    row_golds = [problems[x.problem].answer for x in inputs for _ in range(n)]
    scored = reward_fn(rollout.texts, row_golds, **row_fields(problems, inputs, n, spec.depth))
    base = torch.tensor([float("nan") if r is None else r for r in scored.rewards])
    prev = [x.prev_correct for x in inputs for _ in range(n)]
    rewards = layer_rewards(base, scored.correct, prev, spec.reward, spec.improvement_bonus)
    overlong = None
    if spec.overlong_buffer_len is not None:
        overlong = overlong_penalty(rollout.lengths.cpu(), spec.max_new_tokens, spec.overlong_buffer_len,
                                    spec.overlong_penalty_factor).to(rewards.dtype)
        rewards = rewards + overlong  # an ungradable completion stays NaN
    rewards = rewards.view(-1, n)
    terms, weights = reward_terms(scored, prev, spec, n, overlong) if advantages.decoupled else (None, None)
    adv = advantages(rewards, rollout.lengths.cpu().view(-1, n), terms, weights)
    correct = list(scored.correct)
    keep = torch.tensor([bool(c) for c in correct]) if spec.keep_successful else None
    result = LayerResult(inputs, rollout, correct, rewards, adv, keep, terms=terms, term_weights=weights,
                         prompts_cut=sum(cut for _, cut in fitted), overlong=overlong)
    result.metrics = layer_metrics(result)
    return result


def reward_terms(scored, prev: Sequence[Optional[bool]], spec: LayerSpec, n: int,
                 overlong: Optional[torch.Tensor] = None) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The (groups, n, K) reward-term values (NaN = ungradable) and (K,) weights of ``scored`` for GDPO's
    per-term normalisation; a correction layer's improvement bonus and the ``overlong`` penalty (per
    completion) are one more term each, of weight 1. (None, None) when the reward function gives no terms."""
    if scored.terms is None:
        return None, None
    values = torch.tensor([[float("nan") if v is None else float(v) for v in row] for row in scored.terms],
                          dtype=torch.float32)
    weights = torch.tensor(scored.weights, dtype=torch.float32)
    if spec.reward == "improvement":
        zero = torch.zeros(len(scored.terms))
        bonus = layer_rewards(zero, scored.correct, prev, "improvement", spec.improvement_bonus)
        values, weights = torch.cat([values, bonus.unsqueeze(-1)], -1), torch.cat([weights, torch.ones(1)])
    if overlong is not None:
        values = torch.cat([values, overlong.to(values.dtype).unsqueeze(-1)], -1)
        weights = torch.cat([weights, torch.ones(1)])
    return values.view(-1, n, values.shape[-1]), weights


def layer_metrics(result: LayerResult) -> dict[str, float]:
    """What a layer's rollout looked like: rewards, accuracy, zero-variance share, lengths (mean, min,
    max, of the completions that ended with EOS, the share cut off: ``clipped_ratio``), the sampled
    prompt + completion tokens (``num_tokens`` per row as TRL counts them, ``num_tokens_computed`` with
    each group's prompt once), the prompts whose earlier answers were shortened to fit (``prompts_cut``),
    for corrections the wrong<->right transitions, and with overlong shaping the mean penalty
    (``overlong_penalty``) and the share of completions it reached (``overlong_share``)."""
    rewards, rollout, correct = result.rewards, result.rollout, result.correct
    valid = ~torch.isnan(rewards)
    metrics = {
        "reward_mean": rewards[valid].mean().item() if valid.any() else 0.0,
        "reward_std": rewards[valid].std().item() if valid.sum() > 1 else 0.0,
        "accuracy": sum(1 for c in correct if c) / max(len(correct), 1),
        "zero_variance_groups": advantage.zero_variance_share(rewards) if rewards.numel() else 0.0,
        **grpo.length_stats(rollout.lengths.cpu(), rollout.truncated.cpu()),
        "num_tokens": float(rollout.prompt_mask.sum().item() + rollout.completion_mask.sum().item()),
        # as sampling computes them: each group's prompt once (prefilled once, its cache shared)
        "num_tokens_computed": float(rollout.prompt_mask[::rollout.n].sum().item()
                                     + rollout.completion_mask.sum().item()),
        "ungradable": float((~valid).sum().item()),
        "groups": float(len(result.inputs)),
        "prompts_cut": float(result.prompts_cut),
    }
    if result.overlong is not None:
        metrics["overlong_penalty"] = result.overlong.mean().item() if result.overlong.numel() else 0.0
        metrics["overlong_share"] = (result.overlong < 0).double().mean().item() if result.overlong.numel() else 0.0
    if result.inputs and result.inputs[0].prev_correct is not None:
        n = rollout.n
        metrics.update(transitions([x.prev_correct for x in result.inputs for _ in range(n)], correct))
    return metrics


# ---------------------------------------------------------------- dynamic sampling (DAPO), per layer

def merge_results(parts: Sequence[LayerResult], groups: Sequence[Sequence[int]], advantages: advantage.Advantages,
                  pad_token_id: int = 0) -> LayerResult:
    """One LayerResult of the groups ``groups[i]`` of ``parts[i]``, in order; advantages recomputed
    over the merged groups (so ``scale_rewards=batch`` sees the batch that is trained on); metrics left
    to the caller."""
    n = parts[0].rollout.n
    rollout = concat_rollouts([r.rollout.groups(g) for r, g in zip(parts, groups, strict=True)], pad_token_id)
    inputs = [r.inputs[i] for r, g in zip(parts, groups, strict=True) for i in g]
    correct = [r.correct[i * n + j] for r, g in zip(parts, groups, strict=True) for i in g for j in range(n)]
    rewards = torch.cat([r.rewards[list(g)] for r, g in zip(parts, groups, strict=True)]).view(-1, n)
    keep = None
    if parts[0].keep is not None:
        keep = torch.cat([r.keep.view(-1, n)[list(g)].reshape(-1) for r, g in zip(parts, groups, strict=True)])
    terms = weights = overlong = None
    if parts[0].terms is not None:
        terms = torch.cat([r.terms[list(g)] for r, g in zip(parts, groups, strict=True)])
        weights = parts[0].term_weights
    if parts[0].overlong is not None:
        overlong = torch.cat([r.overlong.view(-1, n)[list(g)].reshape(-1) for r, g in zip(parts, groups, strict=True)])
    adv = advantages(rewards, rollout.lengths.cpu().view(-1, n), terms, weights)
    return LayerResult(inputs, rollout, correct, rewards, adv, keep, terms=terms, term_weights=weights,
                       prompts_cut=sum(r.prompts_cut for r in parts), overlong=overlong)


@dataclass
class Sampled:
    """A layer's step with dynamic sampling: the batch it trains on and every rollout it made."""

    train: LayerResult  # the kept groups (at most the first round's number), advantages over them
    rounds: list[LayerResult]  # each rollout as sampled (the next layer's inputs come from these)
    metrics: dict[str, float]  # layer_metrics over every round, the rounds used and the share kept


def fill_layer(run: Callable[[list[LayerInput]], LayerResult], inputs: list[LayerInput],
               draw: Callable[[int, int], list[LayerInput]], spec: LayerSpec, advantages: advantage.Advantages,
               pad_token_id: int = 0) -> Sampled:
    """DAPO's dynamic sampling for one layer: ``run`` the inputs, keep the groups whose rewards vary
    (``advantage.varied_groups``) and, while fewer than ``len(inputs)`` are kept and fewer than
    ``spec.max_sampling_rounds`` rollouts were made, ``draw(k, round)`` k more inputs and run them.
    The first ``len(inputs)`` kept groups are trained on; a draw that comes back empty ends the search."""
    target = len(inputs)
    rounds = [run(inputs)]
    kept = [advantage.varied_groups(rounds[0].rewards).nonzero().squeeze(-1).tolist()]
    while sum(map(len, kept)) < target and len(rounds) < spec.max_sampling_rounds:
        more = draw(target - sum(map(len, kept)), len(rounds))
        if not more:
            break
        rounds.append(run(more))
        kept.append(advantage.varied_groups(rounds[-1].rewards).nonzero().squeeze(-1).tolist())
    budget, trimmed = target, []
    for g in kept:  # DAPO keeps exactly the batch size: extra groups of the last round are not trained on
        trimmed.append(g[:budget])
        budget -= len(trimmed[-1])
    everything = merge_results(rounds, [range(len(r.inputs)) for r in rounds], advantages, pad_token_id)
    sampled = sum(len(r.inputs) for r in rounds)
    metrics = {**layer_metrics(everything), "sampling_rounds": float(len(rounds)),
               "kept_share": sum(map(len, trimmed)) / max(sampled, 1)}
    return Sampled(merge_results(rounds, trimmed, advantages, pad_token_id), rounds, metrics)


def unused_responses(rounds: Sequence[LayerResult], chosen: set[tuple[int, int, int]], spec: LayerSpec,
                     rng: random.Random) -> list[LayerInput]:
    """The next layer's spare inputs for its dynamic sampling: every response of ``rounds`` not already
    ``chosen`` (as (round, group, response)) that ``spec.select``'s rule allows as a spare (``wrong``:
    the wrong ones), each with a guiding phrase, in a shuffled order."""
    allowed = SELECTION_RULES[spec.select].spare
    spare = []
    for r, res in enumerate(rounds):
        n = res.rollout.n
        for g in range(len(res.inputs)):
            for i in range(n):
                if (r, g, i) in chosen or not allowed(res.correct[g * n + i]):
                    continue
                spare.append((r, g, i))
    rng.shuffle(spare)
    return [next_inputs(rounds[r].inputs, rounds[r].rollout.texts, rounds[r].correct, rounds[r].rollout.n,
                        [(g, i)], spec.phrases, rng)[0] for r, g, i in spare]


@dataclass(frozen=True)
class Link:
    """What a layer hands the next one: its inputs and, for its dynamic sampling, the spare ones."""

    inputs: list[LayerInput]
    spare: list[LayerInput]


def link(rounds: Sequence[LayerResult], spec: LayerSpec, rng: random.Random) -> Link:
    """The next layer's inputs from a layer's rollouts (``Sampled.rounds``; the first is the batch's
    own): the responses of the first that ``spec.select`` picks, each with a guiding phrase, and, with
    dynamic sampling, every other response the rule allows as a spare (:func:`unused_responses`).
    Nothing after the last layer (``select`` None)."""
    if spec.select is None:
        return Link([], [])
    chosen = chosen_after(rounds[0], spec, rng)
    inputs = inputs_after(rounds[0], spec, rng, chosen)
    spare = unused_responses(rounds, {(0, g, i) for g, i in chosen}, spec, rng) if spec.dynamic_sampling else []
    return Link(inputs, spare)
