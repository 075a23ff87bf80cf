"""Small stateful controllers of a training run, each with its own ``state_dict``, held by the module
and saved in its checkpoint (``module.on_save_checkpoint``), each testable alone.

- :class:`EntropyControl`: the entropy bonus's coefficient per layer: fixed (``grpo.entropy_coef``), or
  steered once per training step by Skywork-OR1's adaptive control (``grpo.next_entropy_coef``) from
  the layer's entropy (averaged over ranks, so every rank holds the same coefficients).
- :class:`ReferenceSync`: TR-DPO: every ``every`` optimizer steps the KL reference becomes
  alpha x policy + (1 - alpha) x itself (``grpo.mix_into``); the moved reference is run state.
- :class:`Refill`: dynamic sampling's more inputs of a layer (no state: its draws are functions of the step).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Optional

from mgrpo_cli.algo import grpo
from mgrpo_cli.algo.layers import LayerInput, first_inputs
from mgrpo_cli.data.problems import Problem


class EntropyControl:
    """The entropy bonus's coefficient of each layer depth (see the module docstring)."""

    def __init__(self, depths: Iterable[int], coef: float, adaptive: bool, target: float, step: float,
                 low: float, high: float):
        self.coef, self.adaptive, self.target = coef, adaptive, target
        self.step, self.low, self.high = step, low, high
        self.coefs = {depth: coef for depth in depths}  # the coefficient per layer depth
        self.last_entropy = {depth: float("inf") for depth in self.coefs}  # the last step's (rank-averaged) entropy

    @property
    def active(self) -> bool:
        """Whether the loss carries an entropy term (a coefficient, or the adaptive controller)."""
        return self.coef != 0 or self.adaptive

    def applied(self, depth: int) -> float:
        """The coefficient this step applies to layer ``depth`` (``grpo.applied_entropy_coef``)."""
        return grpo.applied_entropy_coef(self.coefs[depth], self.last_entropy[depth], self.adaptive, self.target)

    def observe(self, metrics: dict[str, float]) -> None:
        """After a training step: each layer's coefficient steered from its entropy in ``metrics``
        (``train/layer<depth>/entropy``; a layer that did not run keeps its own)."""
        if not self.adaptive:
            return
        for depth in self.coefs:
            entropy = metrics.get(f"train/layer{depth}/entropy")
            if entropy is None:
                continue
            self.coefs[depth] = grpo.next_entropy_coef(self.coefs[depth], entropy, self.target, self.step,
                                                       self.low, self.high)
            self.last_entropy[depth] = entropy

    def state_dict(self) -> dict[str, Any]:
        return {"entropy_coefs": dict(self.coefs), "last_entropy": dict(self.last_entropy)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coefs.update(state.get("entropy_coefs", {}))
        self.last_entropy.update(state.get("last_entropy", {}))


class ReferenceSync:
    """TR-DPO's moving KL reference (see the module docstring); ``reference`` is moved in place."""

    def __init__(self, reference, alpha: float, every: int):
        self._reference = [reference]  # a list: the module holding this must neither register nor checkpoint it
        self.alpha, self.every = alpha, every
        self.syncs = 0  # reference updates made

    def after_step(self, global_step: int, policy) -> None:
        """After optimizer step ``global_step``: every ``every``-th one the reference moves alpha of the
        way to ``policy``; every rank does the same with the same (averaged) weights."""
        if global_step % self.every != 0:
            return
        grpo.mix_into(list(self._reference[0].parameters()), list(policy.parameters()), self.alpha)
        self.syncs += 1

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self._reference[0].state_dict(), "ref_syncs": self.syncs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "reference" in state:
            self._reference[0].load_state_dict(state["reference"])
            self.syncs = state.get("ref_syncs", 0)


class Refill:
    """DAPO's dynamic sampling: where a layer's more inputs come from within one training step. Layer 1
    draws more problems (``draw_problems(step, rank, round, n)``, ``data.ProblemStream.refill``), a
    correction layer takes the spare responses of the layer before (``layers.link``). Every draw is a
    pure function of (seed, step, rank, round), so it has no state to checkpoint."""

    def __init__(self, draw_problems: Optional[Callable[[int, int, int, int], list[Problem]]]):
        self.draw_problems = draw_problems

    def draws(self, depth: int, problems: list[Problem], spare: list[LayerInput], step: int,
              rank: int) -> Callable[[int, int], list[LayerInput]]:
        """``draw(n, round)`` for ``layers.fill_layer``: up to ``n`` more inputs of layer ``depth``; layer
        1's new problems are appended to ``problems`` (the step's), the spares taken off ``spare``."""
        def draw(n: int, round_: int) -> list[LayerInput]:
            if depth > 1:
                taken = spare[:n]
                del spare[:n]
                return taken
            if self.draw_problems is None:
                return []
            first = len(problems)
            problems.extend(self.draw_problems(step, rank, round_, n))
            return first_inputs(len(problems))[first:]

        return draw
