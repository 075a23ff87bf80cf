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

from mgrpo_cli.config import conf_dir, register_configs

log = logging.getLogger(__name__)


class RescoreError(ValueError):
    pass


# ---------------------------------------------------------------------------- records and scores

def grade_records(records: list[dict], grader) -> list[dict]:
    """(Re-)grade every record's completions and t2 completion against its gold, in place."""
    from mgrpo_cli.rewards import extract_answer

    flat = [(i, c) for i, r in enumerate(records) for c in r["completions"]]
    verdicts = grader.correct([c for _, c in flat], [records[i]["gold"] for i, _ in flat])
    for r in records:
        r["answers"], r["correct"] = [], []
    for (i, c), v in zip(flat, verdicts):
        records[i]["answers"].append(extract_answer(c, last_number_fallback=grader.last_number_fallback))
        records[i]["correct"].append(v)
    with_t2 = [r for r in records if r.get("t2_completion") is not None]
    if with_t2:
        v2 = grader.correct([r["t2_completion"] for r in with_t2], [r["gold"] for r in with_t2])
        for r, v in zip(with_t2, v2):
            r["t2_answer"] = extract_answer(r["t2_completion"], last_number_fallback=grader.last_number_fallback)
            r["t2_correct"] = v
    return records


def summarize(records: list[dict]) -> dict[str, Any]:
    """Accuracy (t1 = first completion), pass@k/maj@k when n > 1, t1/t2 metrics, breakdowns."""
    from mgrpo_cli.metrics import breakdown, maj_at_k, mean_pass_at_k, self_correction

    if not records:
        raise RescoreError("no problems to score")
    t1 = [bool(r["correct"][0]) for r in records]
    out: dict[str, Any] = {"n": len(records), "acc_t1": sum(t1) / len(t1)}
    n = min(len(r["completions"]) for r in records)
    if n > 1:
        counts = [(n, sum(bool(c) for c in r["correct"][:n])) for r in records]
        out["mean_acc"] = sum(c for _, c in counts) / (n * len(records))
        k = 1
        while k <= n:
            out[f"pass@{k}"] = mean_pass_at_k(counts, k)
            k *= 2
        out[f"maj@{n}"] = sum(maj_at_k(r["answers"], r["correct"], n) for r in records) / len(records)
    if all(r.get("t2_correct") is not None or r.get("t2_completion") is not None for r in records):
        out.update(self_correction(t1, [bool(r.get("t2_correct")) for r in records]))
    rows = [{"correct": ok, "level": r.get("level"), "subject": r.get("subject")} for r, ok in zip(records, t1)]
    for key in ("level", "subject"):
        if any(r.get(key) is not None for r in records):
            out[f"by_{key}"] = breakdown(rows, key)
    return out


def read_records(path: str | Path) -> list[dict]:
    """A per-problem JSONL (ours, or another tool's with ``gold`` and ``completions``/``completion``)."""
    p = Path(path)
    if not p.is_file():
        raise RescoreError(f"rescore: no such file {p}")
    records = []
    with p.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RescoreError(f"{p}:{line_no}: bad JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise RescoreError(f"{p}:{line_no}: not a JSON object")
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
    from mgrpo_cli.plots import plot_breakdown, plot_transitions

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

def load_model(cfg: Any, grader_correct):
    """The policy to score: ``checkpoint`` (Lightning .ckpt), ``model.path`` (export/HF folder), or
    the tiny model's warm start.

    A checkpoint is rebuilt with the model and LoRA settings it was trained with (a ``model.<key>`` or
    ``lora.<key>`` given on the command line still wins), then its weights are loaded.
    """
    import torch
    from omegaconf import OmegaConf

    from mgrpo_cli.modeling import apply_lora
    from mgrpo_cli.train import build_policy, overrides

    if cfg.checkpoint:
        ckpt_path = Path(cfg.checkpoint)
        if not ckpt_path.is_file():
            raise FileNotFoundError(f"checkpoint={cfg.checkpoint}: no such file")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = ckpt.get("hyper_parameters", {}).get("config", {})
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides()}
        keep = {group: {k: v for k, v in (saved.get(group) or {}).items() if f"{group}.{k}" not in given}
                for group in ("model", "lora")}
        cfg = OmegaConf.merge(cfg, keep, {"warmup": {"enabled": False}})  # the weights come from the checkpoint
        policy, tok, _ = build_policy(cfg, grader_correct)
        if cfg.lora.enabled:
            policy = apply_lora(policy, cfg.lora)
        state = {k[len("policy."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("policy.")}
        policy.load_state_dict(state)
        return policy, tok, str(ckpt_path)
    policy, tok, source = build_policy(cfg, grader_correct)
    return policy, tok, source


def generate_records(cfg: Any, problems, grader) -> tuple[list[dict], float]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mgrpo_cli.config import correction_budget
    from mgrpo_cli.layers import solve
    from mgrpo_cli.modeling import device_for
    from mgrpo_cli.prompts import PromptRenderer
    from mgrpo_cli.rollout import build_engine

    ev, lay, m = cfg.eval, cfg.layer, cfg.model
    if ev.n > 1 and ev.temperature <= 0:
        raise ValueError(f"eval.n={ev.n} samples per problem need eval.temperature > 0 (got {ev.temperature})")
    policy, tok, source = load_model(cfg, grader.correct)
    policy.eval().to(device_for(cfg.trainer.accelerator))  # trainer=gpu scores on the GPU
    log.info("scoring %s on %d problems", source, len(problems))
    renderer = PromptRenderer(tok, m.prompt_template, cfg.system_prompt, lay.input_mode, lay.phrase_template,
                              lay.new_turn_prompt)
    engine = build_engine(cfg.rollout.engine, policy, tok, max_prompt_length=m.max_prompt_length, seed=cfg.seed)
    total = len(problems) * (2 if ev.two_pass else 1)
    t1_budget = ev.max_new_tokens or m.max_completion_length
    start = time.perf_counter()
    with Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task("eval", total=total, rate="")

        def advance(k: int) -> None:
            bar.advance(task, k)
            done = bar.tasks[0].completed
            bar.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):.1f} problems/s")

        solved = solve(engine, renderer, grader.correct, [p.question for p in problems], [p.answer for p in problems],
                       max_new_tokens=t1_budget, batch_size=ev.batch_size, n=ev.n, temperature=ev.temperature,
                       phrase=lay.eval_phrase if ev.two_pass else None, progress=advance,
                       max_new_tokens_t2=correction_budget(cfg, t1_budget))
    seconds = time.perf_counter() - start
    records = []
    for i, p in enumerate(problems):
        r = {"id": p.id, "question": p.question, "gold": p.answer, "subject": p.meta.get("subject"),
             "level": p.meta.get("level"), "prompt": solved.prompts[i], "completions": solved.t1_texts[i]}
        if solved.t2_texts is not None:
            r["t2_prompt"], r["t2_completion"] = solved.t2_prompts[i], solved.t2_texts[i]
        records.append(r)
    return records, len(problems) / max(seconds, 1e-9)


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    from mgrpo_cli.loaders import load_problems
    from mgrpo_cli.rewards import build_reward
    from mgrpo_cli.tracking import RunLogger, run_resources
    from mgrpo_cli.train import overrides, run_dir, setup_runtime

    setup_runtime(cfg)
    out = run_dir(cfg)
    reward_fn = build_reward(cfg.reward)
    grader = reward_fn.grader
    run_logger = None
    with run_resources(reward_fn) as scope:
        if cfg.export_to:
            from mgrpo_cli.modeling import export

            policy, tok, source = load_model(cfg, grader.correct)
            folder = export(policy, tok, cfg.export_to, merge_lora=cfg.lora.export == "merged")
            log.info("exported %s to %s", source, folder)
            return {"export": str(folder)}
        skipped, rate = 0, None
        if cfg.rescore:
            records = read_records(cfg.rescore)
        else:
            loaded = load_problems(cfg.dataset, cfg.eval.split, limit=cfg.eval.limit, seed=cfg.seed if cfg.eval.limit else None)
            skipped = loaded.skipped
            if skipped:
                log.warning("skipped %d malformed rows of %s", skipped, loaded.source)
            records, rate = generate_records(cfg, loaded.problems, grader)
        name = cfg.dataset.name
        grade_records(records, grader)
        summary = summarize(records)
        summary["skipped_rows"] = skipped
        if rate is not None:
            summary["problems_per_s"] = rate
        summary["grader"] = grader.stats()
        files = write_outputs(out, name, records, summary)
        if cfg.logger.enabled:
            run_logger = scope.run_logger = RunLogger(cfg, run_name=f"eval-{name}-{out.name}", overrides=overrides())
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
def main(cfg: DictConfig) -> Optional[float]:
    return run_eval(cfg).get("acc_t1")
