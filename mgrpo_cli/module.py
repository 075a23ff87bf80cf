"""The Lightning module: one ``training_step`` runs every GRPO layer of MGRPO on the same policy.

Layer 1 is GRPO on the questions (G samples each). Layer d >= 2 takes responses of layer d-1
(selected by ``layer.select``), appends a guiding phrase, samples H corrections each and applies
the same rollout -> grade -> advantage -> loss path (``layers.run_layer`` and
``layers.policy_loss_backward``). Layer losses are summed (L1 + lambda * L2, one optimizer step) or
applied as sequential optimizer steps. Validation is the two-pass (t1, t2) greedy evaluation.
Manual optimization: the step owns its backward passes (micro-batched) and the optimizer step.
On several processes (``mgrpo_cli.distributed``): each rank draws its own prompts, DDP gradients
are averaged once per optimizer step, metrics are averaged over ranks, validation problems are split
between ranks and their rows gathered; under FSDP2 the policy is sharded and rollouts gather it whole.
"""
from __future__ import annotations

import json
import logging
import random
import time
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from mgrpo_cli import distributed
from mgrpo_cli import layers as layers_mod
from mgrpo_cli.config import correction_budget
from mgrpo_cli.data import Problem
from mgrpo_cli.layers import LayerInput, LossSettings, completion_logps
from mgrpo_cli.metrics import self_correction
from mgrpo_cli.modeling import is_peft, restore_rotary, rotary_frequencies
from mgrpo_cli.prompts import PromptRenderer
from mgrpo_cli.rollout import Rollout, build_engine

log = logging.getLogger(__name__)


class MGRPOModule(L.LightningModule):
    def __init__(self, policy, tokenizer, cfg: Any, reward_fn, reference=None):
        super().__init__()
        self.automatic_optimization = False
        self.policy = policy
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.reward_fn = reward_fn
        self._reference = [reference]  # a list, so Lightning neither registers nor checkpoints it
        g, lay, m = cfg.grpo, cfg.layer, cfg.model
        self.renderer = PromptRenderer(tokenizer, m.prompt_template, cfg.system_prompt, lay.input_mode,
                                       lay.phrase_template, lay.new_turn_prompt)
        self.engine = build_engine(cfg.rollout.engine, policy, tokenizer, max_prompt_length=m.max_prompt_length,
                                   seed=cfg.seed)
        self.settings = LossSettings(
            beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high, loss_type=g.loss_type,
            scale_rewards=g.scale_rewards, std_eps=g.std_eps, temperature=g.temperature,
            micro_batch_tokens=g.micro_batch_tokens, max_completion_length=m.max_completion_length)
        self.rng = random.Random(cfg.seed)
        self.last_val: dict[str, float] = {}
        self._val_rows: list[dict] = []
        self.run_logger = None  # tracking.RunLogger, for artifacts; set by the train task
        self._rotary = rotary_frequencies(policy)  # restored after Lightning's precision cast (on_fit_start)
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)})

    # ------------------------------------------------------------------ set-up
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.cfg.grpo.lr, weight_decay=self.cfg.grpo.weight_decay)

    def setup(self, stage: str) -> None:
        ref = self._reference[0]
        if ref is not None:
            ref.to(self.device)

    def configure_model(self) -> None:
        """Sharded strategies: ranks must run the same number of forward/backward passes (each one is a
        collective), and under ``trainer=fsdp`` (FSDP2) the policy is sharded here and every rollout
        runs on its gathered full parameters (:class:`distributed.FullParamsEngine`)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy

        strategy, lay = self.trainer.strategy, self.cfg.layer
        sharded = isinstance(strategy, (ModelParallelStrategy, DeepSpeedStrategy))
        if (self.trainer.world_size > 1 and lay.select == "wrong" and lay.depth > 1
                and (sharded or lay.combine == "sequential")):
            raise ValueError(f"layer.select=wrong with trainer={self.cfg.trainer.name}"
                             f"{'' if sharded else ' and layer.combine=sequential'}: a rank whose answers are all "
                             "right would skip layer 2 while the others run it, and their collectives would not match")
        if not sharded:
            return
        self.settings.lockstep = distributed.max_over_ranks
        if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
            raise ValueError("trainer=deepspeed with deepspeed_stage=3 is not supported: ZeRO-3 would fetch "
                             "parameters per module per decoded token; use trainer=fsdp (FSDP2) instead")
        if isinstance(strategy, ModelParallelStrategy) and not distributed.is_sharded(self.policy):
            bf16_mixed = str(self.cfg.trainer.precision).startswith("bf16-mixed")
            distributed.shard_policy(self.policy, strategy.device_mesh["data_parallel"],
                                     param_dtype=torch.bfloat16 if bf16_mixed else None)
            self.engine = distributed.FullParamsEngine(self.engine, self.policy)

    def on_fit_start(self) -> None:
        restore_rotary(self.policy, self._rotary)

    def on_train_start(self) -> None:
        self.policy.train()  # from_pretrained leaves models in eval mode

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch  # problems are text; tensors are made on the device by the rollout

    def _ref_logps(self, rollout: Rollout, rows: torch.Tensor) -> torch.Tensor:
        """Reference log-probs: the LoRA model with its adapter disabled, else the frozen copy."""
        with torch.no_grad():
            if is_peft(self.policy):
                with self.policy.disable_adapter():  # sharded: one forward call, as every rank makes
                    return completion_logps(self.policy, rollout, rows, self.settings.temperature,
                                            share_prompts=self.settings.lockstep is None)
            return completion_logps(self._reference[0], rollout, rows, self.settings.temperature)

    # ------------------------------------------------------------------ training
    def manual_backward(self, loss, *args, **kwargs) -> None:
        """Backward without DDP's all-reduce: ranks may run different numbers of micro-batches, so
        gradients are averaged once per optimizer step, in :meth:`_step_optimizer`."""
        with distributed.no_backward_sync(self.trainer.strategy.model):
            super().manual_backward(loss, *args, **kwargs)

    def _step_optimizer(self, opt) -> None:
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(self.trainer.strategy.model, DistributedDataParallel):
            distributed.all_reduce_grads([p for p in self.policy.parameters() if p.requires_grad])
        self.clip_gradients(opt, gradient_clip_val=self.cfg.grpo.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        opt.zero_grad(set_to_none=True)

    def training_step(self, batch: list[Problem], batch_idx: int):
        start = time.perf_counter()
        opt = self.optimizers()
        g, lay = self.cfg.grpo, self.cfg.layer
        questions, golds = [p.question for p in batch], [p.answer for p in batch]
        inputs = [LayerInput(i) for i in range(len(batch))]
        metrics: dict[str, float] = {}
        results = []
        opt.zero_grad(set_to_none=True)
        for depth in range(1, lay.depth + 1):
            if not inputs:
                break
            first = depth == 1
            n = g.num_generations if first else lay.group_size
            max_new = self.cfg.model.max_completion_length if first else correction_budget(self.cfg)
            result = layers_mod.run_layer(
                self.engine, self.renderer, self.reward_fn, questions, golds, inputs, n=n,
                max_new_tokens=max_new, temperature=g.temperature, top_p=g.top_p, settings=self.settings,
                reward_mode="correct" if first else lay.reward, improvement_bonus=lay.improvement_bonus)
            keep = None
            if not first and lay.keep == "successful":
                keep = torch.tensor([bool(c) for c in result.correct])
            elif not first and lay.keep != "all":
                raise ValueError(f"layer.keep: expected all|successful, got {lay.keep!r}")
            loss_stats = layers_mod.policy_loss_backward(
                self.policy, result.rollout, result.advantages.reshape(-1), self.settings, self.manual_backward,
                weight=1.0 if first else lay.weight, keep=keep, ref_logps=self._ref_logps)
            if lay.combine == "sequential":
                self._step_optimizer(opt)
            elif lay.combine != "sum":
                raise ValueError(f"layer.combine: expected sum|sequential, got {lay.combine!r}")
            metrics.update({f"train/layer{depth}/{k}": v for k, v in {**result.metrics, **loss_stats}.items()})
            results.append(result)
            if depth < lay.depth:
                table = [result.correct[i * n:(i + 1) * n] for i in range(len(inputs))]
                chosen = layers_mod.select_responses(table, lay.select, lay.k, self.rng)
                inputs = layers_mod.next_inputs(inputs, result.rollout.texts, result.correct, n, chosen,
                                                list(lay.phrases), self.rng)
        if lay.combine == "sum":
            self._step_optimizer(opt)
        metrics.update({f"train/grader/{k}": float(v) for k, v in self.reward_fn.grader.pop_stats().items()})
        metrics["train/step_time"] = time.perf_counter() - start
        metrics = distributed.mean_over_ranks(metrics)
        self.log_dict(metrics, on_step=True, batch_size=len(batch))
        self.log("reward", metrics["train/layer1/reward_mean"], prog_bar=True, logger=False, batch_size=len(batch))
        if "train/layer2/accuracy" in metrics:
            self.log("acc2", metrics["train/layer2/accuracy"], prog_bar=True, logger=False, batch_size=len(batch))
        self._maybe_log_samples(results, batch)

    def _maybe_log_samples(self, results, batch: list[Problem]) -> None:
        every = self.cfg.logger.samples_every
        if not every or self.global_step % every != 0 or self.run_logger is None:
            return
        rows = []
        for depth, res in enumerate(results, start=1):
            n = res.rollout.n
            for j, text in enumerate(res.rollout.texts[: self.cfg.logger.samples_n]):
                x = res.inputs[j // n]
                reward = res.rewards.reshape(-1)[j].item()
                rows.append({"step": self.global_step, "layer": depth, "question": batch[x.problem].question,
                             "gold": batch[x.problem].answer, "turns": [list(t) for t in x.turns],
                             "completion": text, "reward": None if reward != reward else reward})
        self.run_logger.log_text(json.dumps(rows, indent=1), f"samples/step_{self.global_step:06d}.json")

    # ------------------------------------------------------------------ validation: two-pass t1/t2
    def validation_step(self, batch: list[Problem], batch_idx: int):
        """Each rank answers every world_size-th problem of the batch; rows are gathered at epoch end."""
        ev, lay = self.cfg.eval, self.cfg.layer
        mine = batch[self.global_rank::self.trainer.world_size]
        with distributed.full_params(self.policy):  # collective: entered by every rank, even with no problems
            if not mine:
                return
            solved = layers_mod.solve(
                self.engine, self.renderer, self.reward_fn.grader.correct, [p.question for p in mine],
                [p.answer for p in mine], max_new_tokens=self.cfg.model.max_completion_length,
                batch_size=ev.batch_size, phrase=lay.eval_phrase if ev.two_pass else None,
                max_new_tokens_t2=correction_budget(self.cfg))
        for i, _ in enumerate(mine):
            self._val_rows.append({"t1": bool(solved.t1_correct[i][0]),
                                   "t2": bool(solved.t2_correct[i]) if solved.t2_correct else None})

    def on_validation_epoch_end(self) -> None:
        rows, self._val_rows = distributed.gather(self._val_rows), []
        if not rows:
            return
        t1 = [r["t1"] for r in rows]
        if rows[0]["t2"] is None:
            out = {"acc_t1": sum(t1) / len(t1), "n": float(len(t1))}
        else:
            out = self_correction(t1, [r["t2"] for r in rows])
        self.last_val = {k: float(v) for k, v in out.items()}
        # every rank holds the same numbers; sync_dist keeps Lightning's epoch-level bookkeeping consistent
        self.log_dict({f"val/{k}": v for k, v in self.last_val.items()}, batch_size=len(rows),
                      sync_dist=self.trainer.world_size > 1)
