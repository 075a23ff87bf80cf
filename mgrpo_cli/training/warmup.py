"""Supervised warm start of the embedded tiny model on the synthetic ``arith`` task.

A random model earns no reward, so GRPO needs a policy that is already partly right. The warm-up
trains on worked solutions (loss on the solution tokens only) and stops at the first check whose
held-out (``valid`` split) accuracy, with a correction's token budget, reaches
``warmup.target_accuracy``: the band where GRPO has the most to learn. A share of examples (``warmup.correction_share``) are correction examples: a
first attempt (right, or with one step off), a guiding phrase, then a careful one-step-at-a-time
solution (loss on the part after the phrase), so the model starts with a little self-correction.

The result is saved with ``save_pretrained`` under ``warmup.cache_dir/<key>`` (key = hash of
everything that shapes it) and reused by later runs. The warm-up has its own seed (``warmup.seed``,
default 0), not the run's: every run seed starts from the same base model, as every seed of a study
starts from one pretrained model. The warm start of the default configuration ships with the package
(``mgrpo_cli/warmstart/<key>``, 2 MB), made by ``mgrpo train warmup.only=true
warmup.cache_dir=mgrpo_cli/warmstart``; any other configuration is warmed up on first use.

Jobs that need the same new warm start (a sweep under joblib) build it once: the builder holds a lock
on ``<cache_dir>/<key>.lock`` (``fcntl``), writes into a private folder and renames it to ``<key>``
when complete, so a reader finds the whole folder or none; the others wait for the lock and reuse it.
A stop request (SIGTERM, SIGUSR1, Ctrl+C: ``should_stop``) ends the warm-up after the current step
with nothing saved (:class:`WarmupStopped`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mgrpo_cli.algo.solve import SolveSpec, solve
from mgrpo_cli.data.problems import ArithTask, Problem, careful_solution, merged_solution, parse_arith, shortcut_merges
from mgrpo_cli.models.loading import ModelSpec
from mgrpo_cli.models.tiny import build_byte_tokenizer, build_tiny_model
from mgrpo_cli.rollout.engine import HFEngine
from mgrpo_cli.rollout.prompts import PromptRenderer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupSpec:
    """Everything that shapes the warm start (and so its cache key)."""

    model: ModelSpec  # the tiny architecture (hidden_size, ...)
    max_prompt_length: int  # the checks' prompt budget
    arith: dict  # the arith task's parameters
    steps: int
    batch_size: int
    lr: float
    eval_every: int
    target_accuracy: float  # stop at the first check that reaches this held-out accuracy
    correction_share: float  # share of correction examples
    cache_dir: str
    phrases: tuple[str, ...]
    phrase_template: str
    max_new_tokens: int  # the checks' budget: a correction's, room for a careful step-by-step solution
    seed: int


def flawed_attempt(problem: Problem, rng: random.Random, shortcut_prob: float, error_prob: float) -> str:
    """A first attempt (a shortcut with ``shortcut_prob``), with ``error_prob`` one step's result off by 1..10."""
    operands, ops = parse_arith(problem.question)
    merges = shortcut_merges(len(ops), rng, shortcut_prob)
    if rng.random() >= error_prob:
        return merged_solution(operands, ops, merges)
    # an error in one step carries through every later step, as a real slip would
    n_steps = 1 + sum(1 for m in merges if not m)
    bad_step = rng.randrange(n_steps)
    offset = rng.choice([-1, 1]) * rng.randint(1, 10)
    steps, value, expr, step = [], operands[0], str(operands[0]), 0
    for i, (op, x) in enumerate(zip(ops, operands[1:], strict=True)):
        expr += f"{op}{x}"
        value = value + x if op == "+" else value - x
        if i < len(merges) and merges[i]:
            continue
        if step == bad_step:
            value += offset
        steps.append(f"{expr}={value}")
        expr, step = str(value), step + 1
    return " ".join(steps) + f" \\boxed{{{value}}}"


def warmup_examples(task: ArithTask, problems: list[Problem], renderer: PromptRenderer, phrases: list[str],
                    correction_share: float, rng: random.Random) -> list[tuple[str, str]]:
    """(context, target) pairs: the loss covers ``target`` only."""
    out = []
    for p in problems:
        prompt = renderer.render(p.question)
        if rng.random() < correction_share:
            attempt = flawed_attempt(p, rng, task.shortcut_prob, error_prob=0.5)
            context = renderer.render(p.question, ((attempt, rng.choice(phrases)),))
            operands, ops = parse_arith(p.question)
            out.append((context, careful_solution(operands, ops)))
        else:
            out.append((prompt, task.first_attempt(p, rng)))
    return out


def _batch(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 outside the targets)."""
    rows = []
    for context, target in pairs:
        c = tokenizer(context, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((c + t, [-100] * len(c) + t))
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return ids, mask, labels


def sft_step(model, opt, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """One optimizer step of token-mean cross-entropy on the targets, in two length-sorted micro-batches."""
    pairs = sorted(pairs, key=lambda p: len(p[0]) + len(p[1]))
    half = len(pairs) // 2
    parts = [_batch(tokenizer, part) for part in (pairs[:half], pairs[half:]) if part]
    n_tokens = sum((labels != -100).sum().item() for _, _, labels in parts)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for ids, mask, labels in parts:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
            reduction="sum") / n_tokens
        loss.backward()
        total += loss.item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return total


def cache_key(spec: WarmupSpec) -> str:
    shaping = {
        "model": {k: getattr(spec.model, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                             "num_attention_heads", "num_key_value_heads")},
        "arith": dict(spec.arith),
        "warmup": {"steps": spec.steps, "batch_size": spec.batch_size, "lr": spec.lr, "eval_every": spec.eval_every,
                   "target_accuracy": spec.target_accuracy, "correction_share": spec.correction_share},
        "phrases": list(spec.phrases), "phrase_template": spec.phrase_template,
        "max_completion_length": spec.max_new_tokens, "seed": spec.seed, "version": 1,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


SHIPPED = Path(__file__).resolve().parents[1] / "warmstart"


class WarmupStopped(Exception):
    """A stop request ended the warm-up; nothing was saved."""


def _cached(spec: WarmupSpec, key: str) -> Optional[Path]:
    for folder in (Path(spec.cache_dir) / key, SHIPPED / key):
        if (folder / "warmup.json").is_file():
            log.info("warm start: reusing %s (%s)", folder, (folder / "warmup.json").read_text().strip())
            return folder
    return None


@contextlib.contextmanager
def build_lock(path: Path, should_stop: Callable[[], bool]) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (waiting for another process that holds it; a
    stop request while waiting raises :class:`WarmupStopped`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        waited = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("warm start: another job is building it (%s held); waiting", path)
                    waited = True
                if should_stop():
                    raise WarmupStopped("stopped while waiting for another job's warm-up") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def warm_start(spec: WarmupSpec, grader_correct, should_stop: Callable[[], bool] = lambda: False) -> Path:
    """Return the folder of the warmed-up tiny model, training it first if it is not cached (see the
    module docstring for the lock and for ``should_stop``)."""
    key = cache_key(spec)
    found = _cached(spec, key)
    if found is not None:
        return found
    out = Path(spec.cache_dir) / key
    with build_lock(out.with_name(f"{key}.lock"), should_stop):
        found = _cached(spec, key)  # built by the job that held the lock
        if found is not None:
            return found
        log.info("warm start: training the tiny model on arith (cached under %s)", out)
        model, tokenizer, info = _train(spec, grader_correct, should_stop)
        tmp = out.with_name(f".{key}.{os.getpid()}.partial")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "warmup.json").write_text(json.dumps(info))
            os.replace(tmp, out)  # the complete folder appears at once
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("warm start saved to %s: %s", out, info)
    return out


def _train(spec: WarmupSpec, grader_correct, should_stop: Callable[[], bool]):
    """(model, tokenizer, info): the supervised warm-up itself."""
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tokenizer = build_byte_tokenizer()
    model = build_tiny_model(spec.model, tokenizer, seed=spec.seed)
    task = ArithTask(**spec.arith)
    renderer = PromptRenderer(tokenizer, "plain", "", "continue", spec.phrase_template, "")
    engine = HFEngine(model, tokenizer, max_prompt_length=spec.max_prompt_length)
    stream = task.train_stream(seed=spec.seed + 1000)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    check = SolveSpec(spec.max_new_tokens, spec.max_new_tokens, batch_size=256)
    start, acc, step = time.perf_counter(), 0.0, 0
    questions, golds = [p.question for p in task.valid], [p.answer for p in task.valid]
    model.train()
    columns = (TextColumn("[bold]warm-up"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("loss {task.fields[loss]:.3f}  valid acc {task.fields[acc]:.1%}"))
    with Progress(*columns) as bar:
        task_id = bar.add_task("warm-up", total=spec.steps, loss=float("nan"), acc=0.0)
        for step in range(1, spec.steps + 1):
            pairs = warmup_examples(task, [next(stream) for _ in range(spec.batch_size)], renderer,
                                    list(spec.phrases), spec.correction_share, rng)
            loss = sft_step(model, opt, tokenizer, pairs)
            bar.update(task_id, advance=1, loss=loss)
            if should_stop():
                log.warning("warm-up stopped at step %d by a stop request; nothing saved", step)
                raise WarmupStopped(f"stopped at warm-up step {step}")
            if step % spec.eval_every == 0 or step == spec.steps:
                solved = solve(engine, renderer, grader_correct, questions, golds, check)
                acc = sum(1 for row in solved.t1_correct if row[0]) / len(questions)
                log.info("warm-up step %d: loss %.3f, valid accuracy %.3f (%.0f s)", step, loss, acc,
                         time.perf_counter() - start)
                bar.update(task_id, acc=acc)
                if acc >= spec.target_accuracy:
                    break
    return model, tokenizer, {"steps": step, "valid_accuracy": acc, "seconds": round(time.perf_counter() - start, 1)}
