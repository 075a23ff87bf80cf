"""``mgrpo eval``: generate on a dataset, grade with the training grader, write and log the scores.

t1 = the model's answer (greedy, or n samples with pass@k and maj@k); t2 = one self-correction pass
on the first t1 answer with the fixed phrase ``layer.eval_phrase`` (Acc@t1, Acc@t2, Δ, Δi→c, Δc→i).
Outputs in the run folder: ``summary.json``, ``problems.jsonl`` (one record per problem: prompt,
completions, extracted answers, verdicts, t2) and PNG plots; the same scalars in MLflow under
``eval/<dataset>/…``. ``rescore=<problems.jsonl>`` re-grades saved completions without a model.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig

from mgrpo_cli.cli import build
from mgrpo_cli.config import rules
from mgrpo_cli.config.schema import conf_dir, register_configs
from mgrpo_cli.errors import JobFailed, UserError, run_command
from mgrpo_cli.reporting.metrics import summarize

log = logging.getLogger(__name__)


class RescoreError(UserError):
    """A per-problem file that cannot be re-graded (named with file:line)."""


# ---------------------------------------------------------------------------- records and scores

def grade_records(records: list[dict], grader) -> list[dict]:
    """Grade every record's completions and t2 completion against its gold, in place (``rescore=``:
    saved completions; a generated run's records come graded from ``solve``)."""
    from mgrpo_cli.algo.solve import attach_verdicts

    flat = [(i, c) for i, r in enumerate(records) for c in r["completions"]]
    verdicts = grader.correct([c for _, c in flat], [records[i]["gold"] for i, _ in flat])
    correct: list[list] = [[] for _ in records]
    for (i, _), v in zip(flat, verdicts, strict=True):
        correct[i].append(v)
    with_t2 = [r for r in records if r.get("t2_completion") is not None]
    t2 = grader.correct([r["t2_completion"] for r in with_t2], [r["gold"] for r in with_t2]) if with_t2 else []
    return attach_verdicts(records, correct, t2, grader)


def read_records(path: str | Path) -> list[dict]:
    """A per-problem JSONL (ours, or another tool's with ``gold`` and ``completions``/``completion``)."""
    p = Path(path)
    if not p.is_file():
        raise RescoreError(f"rescore: no such file {p}")
    from mgrpo_cli.data.loaders import json_lines

    records = []
    for line_no, row in json_lines(p, RescoreError):
        if "completions" not in row and "completion" in row:
            row["completions"] = [row["completion"]]
        if not isinstance(row.get("completions"), list) or not row["completions"]:
            raise RescoreError(f"{p}:{line_no}: missing field 'completions' (a list of strings)")
        if row.get("gold") in (None, ""):
            raise RescoreError(f"{p}:{line_no}: missing field 'gold'")
        row["gold"] = str(row["gold"])
        row.setdefault("id", f"row-{line_no}")
        records.append(row)
    if not records:
        raise RescoreError(f"rescore: {p} holds no records")
    return records


def write_outputs(out: Path, name: str, records: list[dict], summary: dict) -> list[Path]:
    from mgrpo_cli.reporting.figures import plot_breakdown, plot_transitions

    out.mkdir(parents=True, exist_ok=True)
    with (out / "problems.jsonl").open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    files = [out / "summary.json", out / "problems.jsonl"]
    if "acc_t2" in summary:
        files.append(plot_transitions(summary, out / "transitions.png"))
    groups = {k[3:]: v for k, v in summary.items() if k.startswith("by_")}
    if groups:
        files.append(plot_breakdown(groups, out / "breakdown.png", f"{name}: accuracy at t1"))
    return files


def scalars(summary: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}


# ---------------------------------------------------------------------------- the model side

def generate_records(cfg: Any, policy, tok, problems, grader) -> tuple[list[dict], float, dict[str, int]]:
    """Answer ``problems`` (t1, and t2 when ``eval.two_pass``) with a progress bar; one record each,
    graded once (by ``solve``). Questions longer than ``model.max_prompt_length`` are skipped; the counts
    of those and of t2 prompts whose first answer was shortened come third."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mgrpo_cli.algo.solve import solve

    spec = build.solve_spec(cfg, command="eval")
    renderer, engine = build.renderer(cfg, tok, policy), build.engine(cfg, policy, tok)
    fits = renderer.fits([p.question for p in problems])
    if not all(fits):
        log.warning("skipped %d questions longer than model.max_prompt_length=%d tokens", fits.count(False),
                    cfg.model.max_prompt_length)
        problems = [p for p, ok in zip(problems, fits, strict=True) if ok]
    total = len(problems) * (2 if spec.phrase is not None else 1)
    start = time.perf_counter()
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task("eval", total=total, rate="")

        def advance(k: int) -> None:
            bar.advance(task, k)
            done = bar.tasks[0].completed
            bar.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):.1f} problems/s")

        solved = solve(engine, renderer, grader.correct, [p.question for p in problems], [p.answer for p in problems],
                       spec, progress=advance)
    seconds = time.perf_counter() - start
    graded = solved.records([p.answer for p in problems], grader.answer)
    records = [{"id": p.id, "question": p.question, "gold": p.answer, "subject": p.meta.get("subject"),
                "level": p.meta.get("level"), **record.fields()} for p, record in zip(problems, graded, strict=True)]
    counts = {"skipped_overlong": fits.count(False), "t2_prompts_cut": solved.t2_cut}
    return records, len(problems) / max(seconds, 1e-9), counts


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    rules.check(cfg, "eval")
    build.setup_runtime(cfg)
    from mgrpo_cli.models.loading import device_for, export
    from mgrpo_cli.reporting.tracking import run_resources

    out = build.run_dir(cfg)
    reward_fn = build.reward(cfg)
    grader = reward_fn.grader
    with run_resources(reward_fn) as scope:
        if cfg.export_to:
            policy, tok, source = build.scored_policy(cfg, build.warm_start(cfg, reward_fn))
            folder = export(policy, tok, cfg.export_to, merge_lora=cfg.lora.export == "merged")
            log.info("exported %s to %s", source, folder)
            return {"export": str(folder)}
        skipped, rate, counts = 0, None, {}
        if cfg.rescore:
            records = grade_records(read_records(cfg.rescore), grader)
        else:
            loaded = build.held_out(cfg, seed=cfg.seed)
            problems, skipped = loaded.problems, loaded.skipped
            policy, tok, source = build.scored_policy(cfg, build.warm_start(cfg, reward_fn))
            policy.eval().to(device_for(cfg.trainer.accelerator))  # trainer=gpu scores on the GPU
            log.info("scoring %s on %d problems", source, len(problems))
            records, rate, counts = generate_records(cfg, policy, tok, problems, grader)
        name = cfg.dataset.name
        if not records:
            raise RescoreError("no problems to score")
        summary = summarize(records)  # the same scores as validation during training
        summary["skipped_rows"] = skipped
        summary.update(counts)
        if rate is not None:
            summary["problems_per_s"] = rate
        summary["grader"] = grader.stats()
        files = write_outputs(out, name, records, summary)
        run_logger = scope.run_logger = build.run_logger(cfg, run_name=f"eval-{name}-{out.name}", run_folder=out)
        if run_logger:
            run_logger.log_metrics(scalars(summary, f"eval/{name}"))
            for f in files:
                run_logger.log_file(f)
        _print(name, summary, out)
        return summary


def _print(name: str, summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name}: {summary['n']} problems")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        if isinstance(v, float):
            table.add_row(k, f"{v:.4f}" if k == "problems_per_s" else f"{100 * v:.1f}%")
    Console().print(table)
    Console().print(f"results: {out}")


register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> Optional[float | JobFailed]:
    result = run_command(run_eval, cfg)
    return result if isinstance(result, JobFailed) else (result or {}).get("acc_t1")
