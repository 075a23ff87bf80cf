"""``mgrpo train``: build everything from the config, evaluate the start, train, evaluate the end.

``run_train(cfg)`` is the task function (tests call it with a composed config); ``main`` checks a
``resume=<run folder>`` command line (``resume.prepare_argv``) and runs the thin ``@hydra.main``
wrapper that adds the command line, multirun, run folders and one-line errors.

Every job ends in a known state, in ``<run>/status.json`` and in its MLflow run
(``lifecycle``, ``tracking``): FINISHED when training, the end evaluation and the export are done;
FAILED with the one-line error when anything raised (the MLflow run is made first, before the
config is checked or a model loads); KILLED when SIGTERM, SIGUSR1 or Ctrl+C stopped it, after the
running step and a checkpoint (exit code ``lifecycle.EXIT_PREEMPTED``, 75; a second Ctrl+C stops at
once, exit 130). ``mgrpo train resume=<run>`` continues a run in its folder and its MLflow run
(docs/resume.md).
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from mgrpo_cli.cli import build, resume
from mgrpo_cli.config import rules
from mgrpo_cli.config.schema import conf_dir, register_configs
from mgrpo_cli.errors import EXIT_USER_ERROR, JobFailed, UserError, one_line, run_command
from mgrpo_cli.reporting import heldout, provenance
from mgrpo_cli.training import runlock

log = logging.getLogger(__name__)

SUMMARY_KEYS = ["acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "fix_rate", "break_rate"]


def _global_rank() -> int:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0)


def run_train(cfg: DictConfig) -> dict[str, float]:
    """Train per ``cfg``; returns the start and end held-out metrics. Stopped by a signal, it exits
    (``SystemExit``) with ``lifecycle.EXIT_PREEMPTED`` or ``EXIT_INTERRUPTED`` after recording KILLED.
    Rank 0 holds the run folder's lock (``runlock``) throughout."""
    out = build.run_dir(cfg)
    zero = _global_rank() == 0
    locked_here = zero and runlock.lock(out, "hydra.run.dir")  # a dated folder; main() locks a named one
    try:
        return _run_train(cfg, out, zero)
    finally:
        if locked_here:
            runlock.release(out)


def _run_train(cfg: DictConfig, out: Path, zero: bool) -> dict[str, float]:
    # lifecycle imports Lightning: not at module level, so command-line errors are fast
    from mgrpo_cli.training import lifecycle

    previous = None
    if cfg.get("resume"):
        given = build.overrides()
        cfg = resume.resumed_config(cfg, given, is_global_zero=zero)
        previous = lifecycle.read_status(out) or {}
        if previous.get("status") == "FINISHED" and not {"trainer.max_steps", "trainer.max_time"} & {
                resume.key_of(o) for o in given}:
            raise UserError(f"resume={cfg.resume}: this run has finished; give trainer.max_steps=<more than "
                            f"{cfg.trainer.max_steps}> (or a longer trainer.max_time) to train it further")
    requests = lifecycle.StopRequests()
    requests.install()
    run_logger, status, error, exit_code, reason = None, "FAILED", None, None, None
    try:
        if not cfg.warmup.only:  # the MLflow run first: a job that fails from here on shows as FAILED
            run_logger = build.run_logger(cfg, run_name=f"{cfg.task_name}-{out.name}", run_folder=out,
                                          run_id=(previous or {}).get("mlflow_run_id"))
        if zero:
            lifecycle.write_status(out, "RUNNING", None, run_logger.run_id if run_logger else None)
            provenance.record(out, run_logger)
            lifecycle.on_rank_death(lambda why: _record_end(out, zero, run_logger, "FAILED", why))
        result, stopped, reason = _train(cfg, out, run_logger, requests)
        status = "KILLED" if stopped else "FINISHED"
        exit_code = lifecycle.EXIT_PREEMPTED if stopped else None
    except (KeyboardInterrupt, SystemExit) as e:
        if not (requests.requested or isinstance(e, KeyboardInterrupt)):
            error = one_line(e)
            raise
        # a second Ctrl+C (Lightning turns it into sys.exit(1)), or Lightning's own SIGTERM exit
        status = "KILLED"
        exit_code = lifecycle.EXIT_INTERRUPTED if requests.interrupted or isinstance(e, KeyboardInterrupt) \
            else lifecycle.EXIT_PREEMPTED
    except BaseException as e:
        error = one_line(e)
        raise
    finally:
        requests.restore()
        _record_end(out, zero, run_logger, status, error, reason)
    if exit_code is not None:
        log.warning("stopped by %s (%s); continue with: mgrpo train resume=%s", requests.name or "Ctrl+C",
                    status, out)
        # the other ranks exit cleanly: Lightning's launcher kills rank 0 when a rank it started fails
        sys.exit(exit_code if zero else 0)
    return result


def _record_end(out: Path, zero: bool, run_logger, status: str, error: Optional[str],
                reason: Optional[str] = None) -> None:
    """The job's end in status.json, then in MLflow (which may wait up to 30 s for an absent tracking
    server: status.json is written first); a failure to record never hides the job's own error.
    ``reason``: why a FINISHED run ended before its last step (status.json, the MLflow tag ``stop_reason``)."""
    from mgrpo_cli.training import lifecycle

    run_id = run_logger.run_id if run_logger else None
    if zero:
        lifecycle.write_status(out, status, error, run_id, reason)
    try:
        if run_logger:
            if reason:
                run_logger.set_tags({"stop_reason": reason})
            run_logger.end(status, error)
    except Exception as e:
        log.error("could not record the end of MLflow run %s: %s", run_id, one_line(e))


def _train(cfg: DictConfig, out: Path, run_logger, requests) -> tuple[dict[str, float], bool, Optional[str]]:
    """The run itself: (start, end and best held-out metrics, whether a stop request, ``requests``
    (``lifecycle.StopRequests``), ended it early, why training ended before ``trainer.max_steps``
    when early stopping ended it)."""
    from mgrpo_cli.training import lifecycle

    rules.check(cfg, "train")
    build.setup_runtime(cfg)
    reward_fn = build.reward(cfg)
    try:
        problems = build.data(cfg) if not cfg.warmup.only else None
        from mgrpo_cli.training.warmup import WarmupStopped

        try:
            start_from = build.warm_start(cfg, reward_fn, should_stop=lambda: requests.requested)
        except WarmupStopped:
            return {}, True, None  # nothing half-written: the warm start is saved whole or not at all
        if cfg.warmup.only:
            log.info("warm start ready: %s", start_from)
            return {}, False, None
        setup = build.training(cfg, reward_fn, problems, start_from)
        module = setup.module
        writer = build.checkpoint_writer(cfg, out)
        last = writer.last
        stopper = lifecycle.StopAndCheckpoint(requests, writer, every_minutes=cfg.trainer.checkpoint_every_minutes)
        best = build.best_checkpoints(cfg, out, writer)
        trainer = build.trainer(cfg, out, run_logger.logger if run_logger else None,
                                build.callbacks(cfg, out, run_logger, stopper, writer, best))
        log.info("policy: %s; run folder: %s; %d held-out problems", setup.source, out, setup.n_val)
        start = _saved_start(cfg.ckpt_path) if cfg.get("resume") and cfg.ckpt_path else {}
        if not start and cfg.trainer.val_before_train and not requests.requested:
            start = _validate(trainer, module, setup.val_loader)
        module.start_val = start
        log.info("held-out before training: %s", _fmt(start))
        if requests.requested:
            return {}, True, None
        try:
            trainer.fit(module, train_dataloaders=setup.train_loader, val_dataloaders=setup.val_loader,
                        ckpt_path=cfg.ckpt_path)
        except lifecycle.StopRequested:
            return {}, True, None
        if stopper.stop_pending:  # the request came during the last step
            return {}, True, None
        end = _validate(trainer, module, setup.val_loader)
        log.info("held-out after training:  %s", _fmt(end))
        result = {f"start/{k}": v for k, v in start.items()} | {f"end/{k}": v for k, v in end.items()}
        export_policy(cfg, module.policy, module.tokenizer, out / "export", trainer.is_global_zero, start_from)
        chosen = best.best if best else None
        if chosen is not None:
            step, value, path = chosen
            result |= {f"best/{best.monitor.metric}": value, "best/step": float(step)}
            if trainer.is_global_zero:  # the best validation's weights, from its checkpoint
                policy_model, tok, _ = build.policy(cfg, start_from)
                build.load_policy_weights(policy_model, path)
                export_policy(cfg, policy_model, tok, out / "export-best", True, start_from)
        if trainer.is_global_zero:
            # every validation's val/* by step as well (the held-out scores files; a run without MLflow has them too)
            validations = {str(step): scores for step, scores in heldout.read_scores(out).items()}
            extra = {"validations": validations} | ({"stop_reason": best.stop_reason} if best and best.stop_reason
                                                     else {})
            (out / "result.json").write_text(json.dumps({**result, **extra}, indent=1))
            if run_logger:
                run_logger.log_metrics(result, step=trainer.global_step)
                run_logger.set_tags({"checkpoint": str(last.resolve()) if last.is_file() else "(none)",
                                     "run_dir": str(out.resolve())})
                if cfg.logger.log_export:
                    run_logger.log_folder(out / "export", "export")
                    if chosen is not None:
                        run_logger.log_folder(out / "export-best", "export-best")
            _print_summary(start, end, out)
        if best and best.stop_reason:
            log.info("%s", best.stop_reason)
        return result, False, best.stop_reason if best else None
    finally:
        reward_fn.close()


def _saved_start(checkpoint: str) -> dict[str, float]:
    """The start-of-run held-out metrics a checkpoint of this run carries ({} if none)."""
    import torch

    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    except Exception:
        return {}
    return dict(saved.get("mgrpo", {}).get("start_val", {})) if isinstance(saved, dict) else {}


def export_policy(cfg: Any, policy, tok, folder: Path, is_global_zero: bool, start_from: Optional[str]) -> None:
    """Rank 0 saves the policy (``models.loading.export``; LoRA merged unless ``lora.export=adapter``).

    A sharded policy (trainer=fsdp) is gathered first, with every rank taking part, into a fresh
    unsharded copy on rank 0's CPU.
    """
    from mgrpo_cli.models.loading import export
    from mgrpo_cli.training import distributed

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
def _hydra_main(cfg: DictConfig) -> Optional[float | JobFailed]:
    result = run_command(run_train, cfg)
    return result if isinstance(result, JobFailed) else (result or {}).get("end/acc_t1")


def main() -> None:
    """The ``mgrpo train`` command: a ``resume=`` command line is checked and pointed at its run
    folder (one line and exit 2 when it cannot be resumed), then Hydra runs the task."""
    try:
        given = sys.argv[1:]
        sys.argv = [sys.argv[0], *resume.prepare_argv(given)]
        shown = resume.show_config(sys.argv[1:])  # resume=<run> --cfg job: the run's config, not the defaults
        if shown is None:
            _lock_named_folder(given, sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    if shown is not None:
        print(shown, end="")
        return
    _hydra_main()


def _lock_named_folder(given: list[str], args: list[str]) -> None:
    """Lock the run folder the command line names (``resume=``, or ``hydra.run.dir=`` of a single run)
    before Hydra writes into it (``runlock``); the DDP job's other ranks leave it to rank 0."""
    if any(a in ("-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info") for a in args) \
            or not runlock.is_rank_zero():
        return
    named = [a.split("=", 1)[1].strip("'\"") for a in args if "=" in a and resume.key_of(a) == "hydra.run.dir"]
    if named and "${" not in named[-1]:  # an interpolated folder is locked once Hydra has made it
        key = "resume" if any(resume.key_of(a) == "resume" for a in given if "=" in a) else "hydra.run.dir"
        runlock.lock(Path(named[-1]).expanduser(), key)
