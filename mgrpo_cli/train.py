"""``mgrpo train``: build everything from the config, evaluate the start, train, evaluate the end.

``run_train(cfg)`` is the task function (tests call it with a composed config); ``main`` is the thin
``@hydra.main`` wrapper that adds the command line, multirun and run folders.
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from mgrpo_cli.config import conf_dir, register_configs

log = logging.getLogger(__name__)


def run_dir(cfg: Any) -> Path:
    """Hydra's output folder for this job, or a fresh one under paths.outputs outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    path = Path(cfg.paths.outputs) / cfg.task_name / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def setup_runtime(cfg: Any) -> None:
    import lightning as L
    import torch

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if torch.cuda.is_available():
        # torch's first choice for bf16 attention on Hopper is cuDNN, which builds a plan for every new
        # shape, and rollouts and loss passes bring new shapes all the time: on an H100 the tiny
        # model's bf16 step took 3.5 s against 0.37 s in fp32, where cuDNN attention is not used
        torch.backends.cuda.enable_cudnn_sdp(False)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "httpx", "alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def build_policy(cfg: Any, grader_correct, path_override: Optional[str] = None):
    """(policy, tokenizer, source): the configured model; the embedded tiny one gets its warm start."""
    from mgrpo_cli.modeling import load_policy

    path = path_override or cfg.model.path
    if path is None and cfg.model.name == "tiny" and cfg.warmup.enabled:
        from mgrpo_cli.warmup import warm_start

        path = str(warm_start(cfg, grader_correct))
    policy, tok = load_policy(cfg.model, cfg.trainer.accelerator, cfg.seed, path=path)
    return policy, tok, path or "tiny (random init)"


class ProblemStream:
    """Training problems for the dataloader: endless, shuffled, restarted past ``offset`` batches."""

    def __init__(self, cfg: Any, batch_size: int):
        from mgrpo_cli.loaders import load_problems

        self.cfg, self.batch_size, self.offset, self.rank = cfg, batch_size, 0, 0
        self.pool = None
        if cfg.dataset.kind != "arith":
            loaded = load_problems(cfg.dataset, "train")
            if loaded.skipped:
                log.warning("skipped %d malformed training rows of %s", loaded.skipped, loaded.source)
            self.pool = loaded.problems

    def __iter__(self) -> Iterator[list]:
        seed = (self.cfg.seed * 1_000_003 + self.offset) * 1009 + self.rank
        if self.pool is None:
            from mgrpo_cli.data import ArithTask

            stream = ArithTask(**self.cfg.dataset.arith).train_stream(seed=seed)
        else:
            def cycle():
                rng = random.Random(seed)
                while True:
                    order = list(range(len(self.pool)))
                    rng.shuffle(order)
                    yield from (self.pool[i] for i in order)
            stream = cycle()
        while True:
            yield [next(stream) for _ in range(self.batch_size)]


def _dataloaders(cfg: Any, module) -> tuple[Any, Any, int]:
    from torch.utils.data import DataLoader, IterableDataset

    from mgrpo_cli.loaders import load_problems

    stream = ProblemStream(cfg, cfg.grpo.prompts_per_step)

    class _Batches(IterableDataset):
        """Each item is a whole step's batch; every rank draws its own, so groups are never split."""

        def __iter__(self):
            stream.offset = module.global_step  # a resumed run does not replay the same problems
            stream.rank = module.global_rank
            return iter(stream)

    train = DataLoader(_Batches(), batch_size=None, collate_fn=lambda batch: batch)
    held = load_problems(cfg.dataset, cfg.eval.split, limit=cfg.eval.limit, seed=None if cfg.eval.limit is None else 0)
    if held.skipped:
        log.warning("skipped %d malformed held-out rows of %s", held.skipped, held.source)
    val = DataLoader(held.problems, batch_size=cfg.eval.batch_size, collate_fn=list, shuffle=False)
    return train, val, len(held.problems)


def run_train(cfg: DictConfig) -> dict[str, float]:
    """Train per ``cfg``; returns the start and end held-out metrics."""
    setup_runtime(cfg)
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from mgrpo_cli.distributed import weight_checksums_callback
    from mgrpo_cli.modeling import apply_lora, reference_policy
    from mgrpo_cli.module import MGRPOModule
    from mgrpo_cli.rewards import build_reward
    from mgrpo_cli.tracking import RunLogger, run_resources

    out = run_dir(cfg)
    reward_fn = build_reward(cfg.reward)
    run_logger = None
    with run_resources(reward_fn) as scope:
        if cfg.warmup.only:
            from mgrpo_cli.warmup import warm_start

            path = warm_start(cfg, reward_fn.grader.correct)
            log.info("warm start ready: %s", path)
            return {}
        policy, tok, source = build_policy(cfg, reward_fn.grader.correct)
        if cfg.lora.enabled:
            policy = apply_lora(policy, cfg.lora)
        reference = reference_policy(policy, cfg.grpo.beta)
        module = MGRPOModule(policy, tok, cfg, reward_fn, reference)
        train_dl, val_dl, n_val = _dataloaders(cfg, module)
        if cfg.logger.enabled:
            run_logger = scope.run_logger = RunLogger(cfg, run_name=f"{cfg.task_name}-{out.name}", overrides=overrides())
            module.run_logger = run_logger
        ckpt = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=0,
                               every_n_train_steps=cfg.trainer.checkpoint_every)
        t = cfg.trainer
        callbacks = [ckpt, RichProgressBar()] + ([weight_checksums_callback(out)] if t.weight_checksums else [])
        trainer = L.Trainer(
            accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=_strategy(t),
            precision=t.precision, max_steps=t.max_steps, max_time=t.max_time, val_check_interval=t.val_every,
            check_val_every_n_epoch=None, num_sanity_val_steps=0, log_every_n_steps=1,
            logger=run_logger.logger if run_logger else False, callbacks=callbacks,
            enable_checkpointing=True, default_root_dir=str(out), use_distributed_sampler=False)
        log.info("policy: %s; run folder: %s; %d held-out problems", source, out, n_val)
        start = _validate(trainer, module, val_dl)
        log.info("held-out before training: %s", _fmt(start))
        trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl, ckpt_path=cfg.ckpt_path)
        end = _validate(trainer, module, val_dl)
        log.info("held-out after training:  %s", _fmt(end))
        result = {f"start/{k}": v for k, v in start.items()} | {f"end/{k}": v for k, v in end.items()}
        export_policy(cfg, module.policy, tok, out / "export", trainer.is_global_zero, reward_fn.grader.correct)
        if trainer.is_global_zero:
            (out / "result.json").write_text(json.dumps(result, indent=1))
            if run_logger:
                run_logger.log_metrics(result, step=trainer.global_step)
            _print_summary(start, end, out)
        return result


def export_policy(cfg: Any, policy, tok, folder: Path, is_global_zero: bool, grader_correct) -> None:
    """Rank 0 saves the policy (``modeling.export``; LoRA merged unless ``lora.export=adapter``).

    A sharded policy (trainer=fsdp) is gathered first, with every rank taking part, into a fresh
    unsharded copy on rank 0's CPU.
    """
    from mgrpo_cli import distributed
    from mgrpo_cli.modeling import apply_lora, export

    if distributed.is_sharded(policy):
        state = distributed.full_state_dict(policy)  # collective; the full weights land on rank 0
        if not is_global_zero:
            return
        policy, _, _ = build_policy(cfg, grader_correct)
        if cfg.lora.enabled:
            policy = apply_lora(policy, cfg.lora)
        policy.load_state_dict(state)
    if is_global_zero:
        export(policy, tok, folder, merge_lora=cfg.lora.export == "merged")


def _strategy(t: Any):
    """The Lightning strategy of ``trainer.strategy``: ddp as is; fsdp = FSDP2 over all ranks
    (``ModelParallelStrategy``, the module shards the policy); deepspeed = ZeRO stage 2."""
    if t.strategy == "deepspeed":
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return DeepSpeedStrategy(stage=t.deepspeed_stage or 2)
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(t.devices, int) or t.devices < 1:
            raise ValueError(f"trainer=fsdp needs trainer.devices as a number of devices per node, got {t.devices!r}")
        # one full checkpoint file (rank 0 gathers it), which `mgrpo eval checkpoint=...` reads
        return ModelParallelStrategy(data_parallel_size=t.devices * t.num_nodes, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    return t.strategy


def _validate(trainer, module, val_dl) -> dict[str, float]:
    trainer.validate(module, dataloaders=val_dl, verbose=False)
    return dict(module.last_val)


def _fmt(m: dict[str, float]) -> str:
    keys = ["acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i"]
    return ", ".join(f"{k} {m[k]:.3f}" for k in keys if k in m)


def _print_summary(start: dict, end: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out ({int(end.get('n', 0))} problems)")
    table.add_column("metric")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    for k in ["acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i"]:
        if k in end:
            table.add_row(k, f"{100 * start.get(k, float('nan')):.1f}", f"{100 * end[k]:.1f}")
    Console().print(table)
    Console().print(f"run folder: {out}")


register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    result = run_train(cfg)
    return result.get("end/acc_t1")
