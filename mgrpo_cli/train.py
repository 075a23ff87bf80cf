"""``mgrpo train``: build everything from the config, evaluate the start, train, evaluate the end.

``run_train(cfg)`` is the task function (tests call it with a composed config); ``main`` is the thin
``@hydra.main`` wrapper that adds the command line, multirun, run folders and one-line errors.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from mgrpo_cli import build
from mgrpo_cli.config import conf_dir, register_configs
from mgrpo_cli.errors import run_command

log = logging.getLogger(__name__)

SUMMARY_KEYS = ["acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i"]


def run_train(cfg: DictConfig) -> dict[str, float]:
    """Train per ``cfg``; returns the start and end held-out metrics."""
    build.check(cfg, "train")
    build.setup_runtime(cfg)
    from mgrpo_cli.distributed import weight_checksums_callback
    from mgrpo_cli.tracking import run_resources

    out = build.run_dir(cfg)
    reward_fn = build.reward(cfg)
    with run_resources(reward_fn) as scope:
        problems = build.data(cfg) if not cfg.warmup.only else None
        start_from = build.warm_start(cfg, reward_fn)
        if cfg.warmup.only:
            log.info("warm start ready: %s", start_from)
            return {}
        setup = build.training(cfg, reward_fn, problems, start_from)
        module = setup.module
        run_logger = scope.run_logger = build.run_logger(cfg, run_name=f"{cfg.task_name}-{out.name}", run_folder=out)
        module.run_logger = run_logger
        module.run_dir = out
        callbacks = [weight_checksums_callback(out)] if cfg.trainer.weight_checksums else []
        trainer = build.trainer(cfg, out, run_logger.logger if run_logger else None, callbacks)
        log.info("policy: %s; run folder: %s; %d held-out problems", setup.source, out, setup.n_val)
        start = _validate(trainer, module, setup.val_loader)
        log.info("held-out before training: %s", _fmt(start))
        trainer.fit(module, train_dataloaders=setup.train_loader, val_dataloaders=setup.val_loader,
                    ckpt_path=cfg.ckpt_path)
        end = _validate(trainer, module, setup.val_loader)
        log.info("held-out after training:  %s", _fmt(end))
        result = {f"start/{k}": v for k, v in start.items()} | {f"end/{k}": v for k, v in end.items()}
        export_policy(cfg, module.policy, module.tokenizer, out / "export", trainer.is_global_zero, start_from)
        if trainer.is_global_zero:
            (out / "result.json").write_text(json.dumps(result, indent=1))
            if run_logger:
                run_logger.log_metrics(result, step=trainer.global_step)
            _print_summary(start, end, out)
        return result


def export_policy(cfg: Any, policy, tok, folder: Path, is_global_zero: bool, start_from: Optional[str]) -> None:
    """Rank 0 saves the policy (``modeling.export``; LoRA merged unless ``lora.export=adapter``).

    A sharded policy (trainer=fsdp) is gathered first, with every rank taking part, into a fresh
    unsharded copy on rank 0's CPU.
    """
    from mgrpo_cli import distributed
    from mgrpo_cli.modeling import export

    if distributed.is_sharded(policy):
        state = distributed.full_state_dict(policy)  # collective; the full weights land on rank 0
        if not is_global_zero:
            return
        policy, _, _ = build.policy(cfg, start_from)
        policy.load_state_dict(state)
    if is_global_zero:
        export(policy, tok, folder, merge_lora=cfg.lora.export == "merged")


def _validate(trainer, module, val_dl) -> dict[str, float]:
    trainer.validate(module, dataloaders=val_dl, verbose=False)
    return dict(module.last_val)


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {m[k]:.3f}" for k in SUMMARY_KEYS if k in m)


def _print_summary(start: dict, end: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out ({int(end.get('n', 0))} problems)")
    table.add_column("metric")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    for k in SUMMARY_KEYS:
        if k in end:
            table.add_row(k, f"{100 * start.get(k, float('nan')):.1f}", f"{100 * end[k]:.1f}")
    Console().print(table)
    Console().print(f"run folder: {out}")


register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float]:
    result = run_command(run_train, cfg)
    return result.get("end/acc_t1") if result else None
