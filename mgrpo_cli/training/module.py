"""The Lightning module: one ``training_step`` runs every GRPO layer of MGRPO on the same policy.

``training_step`` loops over the layers' :class:`~mgrpo_cli.algo.layers.LayerSpec`: each layer runs the
same rollout -> grade -> advantage path (``layers.run_layer``; with dynamic sampling
``layers.fill_layer``, refilling the batch with groups whose rewards vary, ``controllers.Refill``) and
prepares the same loss (``loss.prepare_layer_loss``), then ``layers.link`` turns its result into the
next layer's inputs (and spares). Layer losses are summed (L1 + lambda * L2: each of the
``num_iterations`` optimizer steps is one ``loss.loss_pass`` over every layer) or applied as
``num_iterations`` optimizer steps per layer (``OptimSpec.step_per_layer``). Validation is the
two-pass (t1, t2) answer of ``solve`` (greedy, or ``eval.n`` samples), scored as ``mgrpo eval`` scores.
Manual optimization: the step owns its backward passes (micro-batched) and the optimizer step. The
module takes plain objects made by ``mgrpo_cli.cli.build``, never the config, and writes no files: the
samples table and the held-out files are callbacks' (``training.callbacks``), which read
the last step's layers (``trained``) and the last validation's rows (``val_rows``).
On several processes (``mgrpo_cli.training.distributed``): each rank draws its own prompts, DDP gradients are
averaged once per optimizer step, metrics are averaged over ranks, validation problems are split
between ranks and their rows gathered; under FSDP2 the policy is sharded and rollouts gather it whole.

Every training step starts by seeding every random generator from (seed, step, rank)
(``seeding.seed_step``: Python, NumPy, torch CPU and CUDA, the rollout engine, the reward function's
random term, the module's ``rng``),
so a run resumed from a checkpoint draws what the uninterrupted run drew. A step whose loss or
gradient is not finite (on any rank) does not update the weights (``guard``): its gradients are
dropped, the skip is counted (``train/nonfinite_steps``), and after ``max_nonfinite_steps`` such
steps in a row the step raises a ``UserError``. The checkpoint carries the steps done, the guard's
counts, the start-of-run held-out metrics and the state of the small controllers
(``training.controllers``): each layer's entropy-bonus coefficient (``EntropyControl``, steered once per
step) and, with ``ReferenceSync`` (TR-DPO, after each optimizer step), the moved KL reference.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch

from mgrpo_cli.algo.advantage import Advantages
from mgrpo_cli.algo.layers import LayerInput, LayerResult, LayerSpec, Sampled, fill_layer, first_inputs, link, run_layer
from mgrpo_cli.algo.loss import (
    TOKEN_COUNTS,
    LayerLoss,
    Lockstep,
    LossSpec,
    completion_logps,
    loss_pass,
    prepare_layer_loss,
)
from mgrpo_cli.algo.solve import SolveSpec, solve
from mgrpo_cli.data.problems import Problem
from mgrpo_cli.errors import UserError
from mgrpo_cli.models.loading import cast_lm_head_to_fp32, is_peft, restore_rotary, rotary_frequencies
from mgrpo_cli.reporting.metrics import summarize
from mgrpo_cli.rollout.engine import Rollout, RolloutEngine, Sampling
from mgrpo_cli.rollout.prompts import PromptRenderer
from mgrpo_cli.training import distributed
from mgrpo_cli.training.controllers import EntropyControl, ReferenceSync, Refill
from mgrpo_cli.training.guard import NonFiniteGuard, finite, grads_finite
from mgrpo_cli.training.seeding import seed_step, step_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimSpec:
    lr: float
    weight_decay: float
    max_grad_norm: float
    step_per_layer: bool  # layer.combine=sequential: an optimizer step after each layer


@dataclass(frozen=True)
class TrainedStep:
    """What the last training step trained on, for callbacks (``callbacks.SamplesTable``): each layer's
    spec and result, and the step's problems (dynamic sampling's refills included)."""

    layers: list[tuple[LayerSpec, LayerResult]]
    problems: list[Problem]


class MGRPOModule(L.LightningModule):
    def __init__(self, policy, tokenizer, *, engine: RolloutEngine, renderer: PromptRenderer, reward_fn, grader,
                 layers: Sequence[LayerSpec], sampling: Sampling, advantages: Advantages, loss: LossSpec,
                 optim: OptimSpec, validation: SolveSpec, entropy: EntropyControl, seed: int = 0,
                 max_nonfinite_steps: int = 3, reference=None, shard_param_dtype: Optional[torch.dtype] = None,
                 hparams: Optional[dict[str, Any]] = None, refill: Optional[Refill] = None,
                 ref_sync: Optional[ReferenceSync] = None, fp32_head: bool = False):
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.tokenizer = tokenizer
        self.engine, self.renderer, self.reward_fn = engine, renderer, reward_fn
        self.grader = grader  # the reward function's grader: its counters, and validation's verdicts
        self.layers, self.sampling, self.advantages = list(layers), sampling, advantages
        self.loss, self.optim = loss, optim
        self.validation = validation
        self.shard_param_dtype = shard_param_dtype  # FSDP2's compute dtype of gathered parameters (bf16-mixed)
        self.lockstep: Optional[Lockstep] = None  # sharded strategies: every rank runs as many passes
        self._reference = [reference]  # a list, so Lightning neither registers nor checkpoints it
        self.ref_sync = ref_sync  # TR-DPO's moving reference (None: the reference stays the start's)
        self.entropy = entropy  # the entropy bonus's coefficient per layer
        self.refill = refill or Refill(None)  # dynamic sampling's more inputs
        self.fp32_head = fp32_head  # re-applied after Lightning's precision cast (on_fit_start)
        self.seed = seed
        self.rng = random.Random(seed)  # reseeded at every training step
        self.batches_done = 0  # training batches consumed: where the problem stream continues on resume
        self.guard = NonFiniteGuard(max_nonfinite_steps)
        self.start_val: dict[str, float] = {}  # held-out metrics before training, kept in the checkpoint
        self.last_val: dict[str, float] = {}
        self._val_rows: list[dict] = []  # this rank's rows of the running validation
        self.val_rows: list[dict] = []  # the last validation's rows, every rank's (callbacks.HeldoutFiles)
        self.trained: Optional[TrainedStep] = None  # the last training step's layers (callbacks.SamplesTable)
        self._rotary = rotary_frequencies(policy)  # restored after Lightning's precision cast (on_fit_start)
        if hparams is not None:
            self.save_hyperparameters({"config": hparams})

    @property
    def reference(self):
        """The frozen KL reference policy; None when there is none (beta = 0) or LoRA's disabled
        adapter serves as the reference."""
        return self._reference[0]

    # ------------------------------------------------------------------ set-up
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)

    def setup(self, stage: str) -> None:
        ref = self._reference[0]
        if ref is not None:
            ref.to(self.device)

    def configure_model(self) -> None:
        """Sharded strategies: ranks must run the same number of forward/backward passes (each one is a
        collective), and under ``trainer=fsdp`` (FSDP2) the policy is sharded here and every rollout
        runs on its gathered full parameters (:class:`distributed.FullParamsEngine`)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

        strategy = self.trainer.strategy
        if not isinstance(strategy, (ModelParallelStrategy, DeepSpeedStrategy)):
            return
        self.lockstep = distributed.max_over_ranks
        if isinstance(strategy, ModelParallelStrategy) and not distributed.is_sharded(self.policy):
            distributed.shard_policy(self.policy, strategy.device_mesh["data_parallel"], param_dtype=self.shard_param_dtype)
            self.engine = distributed.FullParamsEngine(self.engine, self.policy)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mgrpo"] = {"batches_done": self.batches_done, "nonfinite": self.guard.state_dict(),
                               "start_val": dict(self.start_val), **self.entropy.state_dict()}
        if self.ref_sync is not None:  # the moved reference is state of the run (otherwise a copy of the start)
            checkpoint["mgrpo"].update(self.ref_sync.state_dict())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("mgrpo", {})
        self.batches_done = saved.get("batches_done", 0)
        if "nonfinite" in saved:
            self.guard.load_state_dict(saved["nonfinite"])
        self.entropy.load_state_dict(saved)
        if self.ref_sync is not None:
            self.ref_sync.load_state_dict(saved)
        # start_val stays this run's: resume= reads it from the checkpoint before fit (train._saved_start)

    def on_fit_start(self) -> None:
        restore_rotary(self.policy, self._rotary)
        if self.fp32_head:
            cast_lm_head_to_fp32(self.policy)
            if self._reference[0] is not None:
                cast_lm_head_to_fp32(self._reference[0])

    def on_train_start(self) -> None:
        self.policy.train()  # rollouts switch to eval mode and back; validation leaves it in eval mode

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # problems are text; tensors are made on the device by the rollout

    def _ref_logps(self, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """Reference log-probs: the LoRA model with its adapter disabled, else the frozen copy."""
        with torch.no_grad():
            if is_peft(self.policy):
                with self.policy.disable_adapter():  # sharded: one forward call, as every rank makes
                    return completion_logps(self.policy, rollout, rows, self.loss.temperature,
                                            share_prompts=self.lockstep is None)
            return completion_logps(self._reference[0], rollout, rows, self.loss.temperature)

    # ------------------------------------------------------------------ training
    def manual_backward(self, loss, *args, **kwargs) -> None:
        """Backward without DDP's all-reduce: ranks may run different numbers of micro-batches, so
        gradients are averaged once per optimizer step, in :meth:`_step_optimizer`."""
        with distributed.no_backward_sync(self.trainer.strategy.model):
            super().manual_backward(loss, *args, **kwargs)

    def _step_optimizer(self, opt, loss: float) -> bool:
        """Average the gradients (DDP), then clip and step, unless the loss or a gradient is not finite
        on any rank: then the gradients are dropped and ``opt.step()`` finds none, so neither the
        weights nor the optimizer's state change (Lightning still counts the step). Whether it updated."""
        from torch.nn.parallel import DistributedDataParallel

        params = [p for p in self.policy.parameters() if p.requires_grad]
        if isinstance(self.trainer.strategy.model, DistributedDataParallel):
            distributed.all_reduce_grads(params)
        bad = int(not (finite(loss) and grads_finite(params)))
        if self.trainer.world_size > 1:
            bad = distributed.max_over_ranks(bad)  # sharded gradients: each rank saw its own shard
        if bad:
            opt.zero_grad(set_to_none=True)
        else:
            self.clip_gradients(opt, gradient_clip_val=self.optim.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return not bad

    def _seed_step(self) -> None:
        """Every random draw of this step from (seed, step, rank) alone (see the module docstring)."""
        s = seed_step(self.seed, self.batches_done, self.global_rank)
        self.engine.reseed(s)
        self.reward_fn.reseed(step_seed(self.seed, self.batches_done, self.global_rank, "reward"))
        self.rng = random.Random(step_seed(self.seed, self.batches_done, self.global_rank, "module"))

    def training_step(self, batch: list[Problem], batch_idx: int):
        """Every layer samples (with dynamic sampling, refilling its batch) and prepares its loss; then
        ``num_iterations`` optimizer steps, each a pass over every layer's batch (layer.combine=sum), or
        that many per layer before the next layer samples (sequential)."""
        start = time.perf_counter()
        self._seed_step()
        self.grader.pop_stats()  # the grader's counts since the last step (validation's) are not this step's
        opt = self.optimizers()
        problems = list(batch)  # dynamic sampling appends layer 1's refills
        inputs, spare = first_inputs(len(problems)), []  # this layer's inputs; its dynamic sampling's spares
        metrics: dict[str, float] = {}
        trained: list[tuple[LayerSpec, LayerResult]] = []
        pending: list[tuple[LayerSpec, LayerLoss, dict[str, float]]] = []
        updated = True  # no optimizer step of this training step was skipped as non-finite
        opt.zero_grad(set_to_none=True)
        for spec in self.layers:
            if not inputs:
                break
            sampled = self._sample(spec, problems, inputs, spare)
            result = sampled.train
            layer = prepare_layer_loss(self.policy, result.rollout, result.advantages.reshape(-1), self.loss,
                                       weight=spec.weight, keep=result.keep, ref_logps=self._ref_logps,
                                       lockstep=self.lockstep)
            pending.append((spec, layer, sampled.metrics))
            if self.optim.step_per_layer:
                updated &= self._update(opt, pending, metrics)
                pending = []
            trained.append((spec, result))
            nxt = link(sampled.rounds, spec, self.rng)
            inputs, spare = nxt.inputs, nxt.spare
        if pending:
            updated &= self._update(opt, pending, metrics)
        self.trained = TrainedStep(trained, problems)
        self._end_step(metrics, updated, time.perf_counter() - start, len(batch))
        if self.guard.exhausted:
            raise UserError(
                f"trainer.max_nonfinite_steps={self.guard.limit}: the last {self.guard.in_a_row} training steps "
                f"(up to step {self.batches_done}) had a non-finite loss or gradient, so none of them changed the "
                "weights; the run's last checkpoint holds good weights: lower grpo.lr or grpo.max_grad_norm and "
                "start from it with ckpt_path=")

    def _sample(self, spec: LayerSpec, problems: list[Problem], inputs: list[LayerInput],
                spare: list[LayerInput]) -> Sampled:
        """The layer's rollout(s): one, or with dynamic sampling as many as fill its batch with groups
        whose rewards vary; layer 1 draws more problems, a correction layer more of the layer before's
        responses (``spare``), as ``refill`` says."""
        def run(xs: list[LayerInput]) -> LayerResult:
            return run_layer(self.engine, self.renderer, self.reward_fn, problems, xs, spec, self.sampling,
                             self.advantages)

        if not spec.dynamic_sampling:
            result = run(inputs)
            return Sampled(result, [result], result.metrics)
        draw = self.refill.draws(spec.depth, problems, spare, self.batches_done, self.global_rank)
        return fill_layer(run, inputs, draw, spec, self.advantages, self.tokenizer.pad_token_id or 0)

    def _end_step(self, metrics: dict[str, float], updated: bool, seconds: float, batch_size: int) -> None:
        """The guard's count, the grader's and the step's own metrics; logged (averaged over ranks)."""
        self.guard.observe(updated)
        metrics.update({f"train/grader/{k}": float(v) for k, v in self.grader.pop_stats().items()})
        metrics["train/nonfinite_steps"] = float(self.guard.total)
        metrics["train/step_time"] = seconds
        if self.ref_sync is not None:
            metrics["train/ref_syncs"] = float(self.ref_sync.syncs)
        self.batches_done += 1
        metrics = distributed.mean_over_ranks(metrics)
        self.entropy.observe(metrics)  # once per step, from the rank-averaged entropies
        self._log_step(metrics, batch_size)

    def _update(self, opt, pending: list[tuple[LayerSpec, LayerLoss, dict[str, float]]],
                metrics: dict[str, float]) -> bool:
        """``num_iterations`` optimizer steps, each after one loss pass over every pending layer; adds the
        layers' metrics (loss, KL and clip fractions averaged over the passes, tokens summed) to ``metrics``
        and says whether every step updated the weights (none was skipped as non-finite)."""
        totals: list[dict[str, float]] = [{} for _ in pending]
        updated = True
        for _ in range(self.loss.num_iterations):
            loss = 0.0
            for (spec, layer, _), total in zip(pending, totals, strict=True):
                stats = loss_pass(self.policy, layer, self.loss, self.manual_backward, ref_logps=self._ref_logps,
                                  entropy_coef=self.entropy.applied(spec.depth) if self.entropy.active else 0.0,
                                  lockstep=self.lockstep)
                loss += stats["loss"]
                for k, v in stats.items():
                    total[k] = total.get(k, 0.0) + v
            updated &= self._step_optimizer(opt, loss)
            if self.ref_sync is not None:
                self.ref_sync.after_step(self.trainer.global_step, self.policy)
        mu = self.loss.num_iterations
        for (spec, layer, sampled), total in zip(pending, totals, strict=True):
            passes = {k: v if k in TOKEN_COUNTS else v / mu for k, v in total.items()}
            for k in TOKEN_COUNTS:
                passes[k] += layer.stats.get(k, 0.0)
            if self.entropy.active:
                passes["entropy_coef"] = self.entropy.applied(spec.depth)
            metrics.update({f"train/layer{spec.depth}/{k}": v for k, v in {**sampled, **layer.stats, **passes}.items()})
        return updated

    def _log_step(self, metrics: dict[str, float], batch_size: int) -> None:
        self.log_dict(metrics, on_step=True, batch_size=batch_size)
        self.log("reward", metrics["train/layer1/reward_mean"], prog_bar=True, logger=False, batch_size=batch_size)
        if "train/layer2/accuracy" in metrics:
            self.log("acc2", metrics["train/layer2/accuracy"], prog_bar=True, logger=False, batch_size=batch_size)

    # ------------------------------------------------------------------ validation: two-pass t1/t2
    def validation_step(self, batch: list[Problem], batch_idx: int):
        """Each rank answers every world_size-th problem of the batch (``solve``, as ``mgrpo eval``);
        records are gathered at epoch end. Sampled validation (``validation.n`` > 1) draws from
        (seed, step, rank, batch), so a resumed run validates as the uninterrupted one did."""
        mine = batch[self.global_rank::self.trainer.world_size]
        if self.validation.n > 1:
            s = step_seed(self.seed, self.batches_done, self.global_rank, f"validation/{batch_idx}")
            self.engine.reseed(s)
            torch.manual_seed(s)  # the noise of a CUDA rollout; every training step reseeds it anyway
        with distributed.full_params(self.policy):  # collective: entered by every rank, even with no problems
            if not mine:
                return
            solved = solve(self.engine, self.renderer, self.grader.correct, [p.question for p in mine],
                           [p.answer for p in mine], self.validation)
        graded = solved.records([p.answer for p in mine], self.grader.answer)
        self._val_rows += [{"id": p.id, **record.fields()} for p, record in zip(mine, graded, strict=True)]

    def on_validation_epoch_end(self) -> None:
        """Every rank's records scored as ``mgrpo eval`` scores them (``metrics.summarize``: Acc@t1/t2,
        the transitions, pass@k, maj@k, mean@k), logged as ``val/*``; the held-out rows keep t1 and t2
        of the first sample."""
        records, self._val_rows = distributed.gather(self._val_rows), []
        self.val_rows = [{"id": r["id"], "t1": bool(r["correct"][0]),
                          "t2": bool(r["t2_correct"]) if "t2_correct" in r else None,
                          "t1_answer": r["answers"][0], "t2_answer": r.get("t2_answer")} for r in records]
        if not records:
            return
        # numbers only (not the breakdowns); a rate with no denominator (None) is not logged
        self.last_val = {k: float(v) for k, v in summarize(records).items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)}
        # every rank holds the same numbers; sync_dist keeps Lightning's epoch-level bookkeeping consistent
        self.log_dict({f"val/{k}": v for k, v in self.last_val.items()}, batch_size=len(records),
                      sync_dist=self.trainer.world_size > 1)
