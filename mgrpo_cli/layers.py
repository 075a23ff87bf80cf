"""One GRPO layer as a pipeline (rollout -> grade -> advantages), and what links layers.

Every layer of MGRPO runs :func:`run_layer` on its own inputs with its own :class:`LayerSpec`: layer 1
on the questions with G samples each, layer 2 on (question, a layer-1 response, a guiding phrase)
with H samples each, and a layer k >= 3 on the layer before it the same way; the loss of every layer
is applied by ``loss.policy_loss_backward``. The only layer-specific code is choosing which
responses go on (:func:`select_responses`), building the next inputs (:func:`next_inputs`) and the
optional improvement reward (:func:`layer_rewards`), each driven by the spec's values.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from mgrpo_cli import grpo
from mgrpo_cli.loss import LossSpec
from mgrpo_cli.prompts import PromptRenderer, Turn
from mgrpo_cli.rollout import Rollout, RolloutEngine


@dataclass(frozen=True)
class LayerSpec:
    """What one layer does (built once per depth by the build layer)."""

    depth: int  # 1 = GRPO on the questions; 2+ = corrections of the layer before
    n: int  # samples per input: G (layer 1) or H
    max_new_tokens: int
    reward: str = "correct"  # correct | improvement (+bonus wrong->right, -bonus right->wrong)
    improvement_bonus: float = 1.0
    weight: float = 1.0  # the layer's loss weight (lambda for corrections)
    keep_successful: bool = False  # only correct completions enter the loss ("dynamic verification")
    select: Optional[str] = None  # which responses go on to the next layer: all | wrong | sample; None = last layer
    k: int = 2  # responses per input sent on when select == sample
    phrases: tuple[str, ...] = ()  # guiding phrases appended to the responses sent on


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


def first_inputs(n_problems: int) -> list[LayerInput]:
    """Layer 1's inputs: every problem of the step, no earlier turns."""
    return [LayerInput(i) for i in range(n_problems)]


# ---------------------------------------------------------------- linking layers (pure functions)

def select_responses(correct: Sequence[Sequence[Optional[bool]]], mode: str, k: int,
                     rng: random.Random) -> list[tuple[int, int]]:
    """Which (group, response) pairs of a layer go on to the next layer.

    ``all``: every response; ``wrong``: the wrong ones; ``sample``: k per group, taking one right and
    one wrong first when the group has both (so the next layer sees fixes and confirmations).
    """
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


def inputs_after(result: LayerResult, spec: LayerSpec, rng: random.Random) -> list[LayerInput]:
    """The next layer's inputs: the responses ``spec.select`` picks, each with a guiding phrase."""
    if spec.select is None:
        return []
    n = result.rollout.n
    table = [result.correct[i * n:(i + 1) * n] for i in range(len(result.inputs))]
    chosen = select_responses(table, spec.select, spec.k, rng)
    return next_inputs(result.inputs, result.rollout.texts, result.correct, n, chosen, spec.phrases, rng)


def run_layer(engine: RolloutEngine, renderer: PromptRenderer, reward_fn, questions: Sequence[str],
              golds: Sequence[str], inputs: list[LayerInput], spec: LayerSpec, loss: LossSpec) -> LayerResult:
    """Rollout -> grade -> group advantages for one layer (the loss is applied by the caller)."""
    n = spec.n
    prompts = [renderer.render(questions[x.problem], x.turns) for x in inputs]
    rollout = engine.generate(prompts, n=n, max_new_tokens=spec.max_new_tokens, temperature=loss.temperature,
                              top_p=loss.top_p)
    row_golds = [golds[x.problem] for x in inputs for _ in range(n)]
    scored = reward_fn(rollout.texts, row_golds)
    base = torch.tensor([float("nan") if r is None else r for r in scored.rewards])
    prev = [x.prev_correct for x in inputs for _ in range(n)]
    rewards = layer_rewards(base, scored.correct, prev, spec.reward, spec.improvement_bonus).view(-1, n)
    advantages = grpo.group_advantages(rewards, loss.scale_rewards, loss.std_eps)
    valid = ~torch.isnan(rewards)
    correct = list(scored.correct)
    keep = torch.tensor([bool(c) for c in correct]) if spec.keep_successful else None
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
    return LayerResult(inputs, rollout, correct, rewards, advantages, keep, metrics)
