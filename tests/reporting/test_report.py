"""`mgrpo report` on synthetic runs whose per-problem results are known, checked by hand."""
import json
import math

import numpy as np
import pytest
import yaml
from conftest import run_cli

from mgrpo_cli.cli.report import make_report
from mgrpo_cli.reporting.heldout import ProblemResult, read_rows, step_file, write_rows
from mgrpo_cli.reporting.load import ReportError

T_975_2 = 4.302653  # Student-t 97.5% quantile, 2 degrees of freedom (three seeds)
T_975_19 = 2.093024  # 19 degrees of freedom (twenty problems)
P = 20
IDS = [f"p{i}" for i in range(P)]


def _rows(n_t1: int, n_t2: int) -> list[ProblemResult]:
    """The first n_t1 problems right at t1, the first n_t2 right at t2."""
    return [ProblemResult(pid, i < n_t1, i < n_t2, str(i), str(i)) for i, pid in enumerate(IDS)]


def _train_run(folder, layer: str, seed: int, end: tuple[int, int], extra: dict | None = None,
               overrides: list[str] | None = None, finished: bool = True):
    (folder / ".hydra").mkdir(parents=True)
    config = {"task_name": "train", "seed": seed, "layer": {"name": layer, "depth": 2 if layer == "mgrpo" else 1},
              "dataset": {"name": "arith"}, "eval": {"split": "test", "limit": None},
              "logger": {"enabled": False}, "trainer": {"threads": 1}}
    for k, v in (extra or {}).items():
        node = config
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    overrides = overrides if overrides is not None else [f"layer={layer}", f"seed={seed}", "trainer.threads=1"]
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    write_rows(step_file(folder, 0), _rows(6, 8))
    write_rows(step_file(folder, 5), _rows(6, 6))
    if finished:
        write_rows(step_file(folder, 10), _rows(*end))
        (folder / "result.json").write_text("{}")


# end (t1 right, t2 right) of 20 problems per seed: GRPO Acc@t2 = 50/60/70%, MGRPO 70/80/90%
GRPO_END = {0: (8, 10), 1: (8, 12), 2: (8, 14)}
MGRPO_END = {0: (10, 14), 1: (10, 16), 2: (12, 18)}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    job = 0
    for layer, ends in (("grpo", GRPO_END), ("mgrpo", MGRPO_END)):
        for seed, end in ends.items():
            _train_run(root / str(job), layer, seed, end)
            job += 1
    return root


def test_rows_round_trip_and_eval_rows_are_read(tmp_path):
    rows = _rows(3, 5)
    assert read_rows(write_rows(tmp_path / "a.jsonl", rows)) == rows
    (tmp_path / "problems.jsonl").write_text(json.dumps(
        {"id": 7, "gold": "3", "completions": ["x"], "answers": ["3"], "correct": [True], "t2_correct": False,
         "t2_answer": "4"}) + "\n")
    assert read_rows(tmp_path / "problems.jsonl") == [ProblemResult("7", True, False, "3", "4")]
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "t1": true}\n{"id": 1, "t1": false}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: problem id '1' appears twice"):
        read_rows(tmp_path / "bad.jsonl")


def test_report_numbers_match_a_hand_computation(sweep, tmp_path):
    rep = make_report([str(sweep)], out=tmp_path / "out", log_mlflow=False, n_resamples=4000)
    an = rep.analysis
    assert an.grouping.keys == ["layer"] and [g.label for g in an.grouping.groups] == ["grpo", "mgrpo"]
    assert [g.seeds for g in an.grouping.groups] == [[0, 1, 2], [0, 1, 2]]
    assert an.steps == (0, 10) and len(an.ids) == P
    # GRPO Acc@t2 at the end: 0.5, 0.6, 0.7 -> 0.6 ± t(2) * 0.1 / sqrt(3)
    g = an.end["grpo"]["acc_t2"]
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert g.mean == pytest.approx(0.6) and g.low == pytest.approx(0.6 - half, abs=1e-6)
    assert g.high == pytest.approx(0.6 + half, abs=1e-6) and g.n == 3
    # MGRPO Acc@t1 at the end: 0.5, 0.5, 0.6 -> mean 16/30, s = 0.0577
    m = an.end["mgrpo"]["acc_t1"]
    half = T_975_2 * np.std([0.5, 0.5, 0.6], ddof=1) / math.sqrt(3)
    assert m.mean == pytest.approx(16 / 30) and m.high - m.mean == pytest.approx(half, abs=1e-6)
    # GRPO wrong->right: (2, 4, 6) of 20; right->wrong never; the start is the same for all
    assert an.end["grpo"]["delta_i2c"].mean == pytest.approx(0.2)
    assert an.end["grpo"]["delta_c2i"].mean == 0.0
    assert an.start["mgrpo"]["acc_t2"].mean == pytest.approx(0.4)
    assert an.transitions["mgrpo"]["wr"].mean == pytest.approx((4 + 6 + 6) / 60)
    # paired difference MGRPO - GRPO in Acc@t2: +4 problems of 20 in every seed -> +0.2 on each seed,
    # so the t-interval over the per-seed differences is that point
    diff = next(c for c in an.comparisons if c.metric == "acc_t2")
    assert (diff.diff.mean, diff.diff.low, diff.diff.high) == (pytest.approx(0.2),) * 3 and diff.diff.p < 1e-12
    assert diff.role == "primary" and diff.verdict == "better (interval excludes 0)"
    line = diff.line()
    assert line.startswith("mgrpo Acc@t2 − grpo Acc@t2 = +20.0 [+20.0, +20.0]")
    assert line.endswith(" points (3 seeds × 20 problems): better (interval excludes 0)")
    # with the problems random too: the per-problem differences vary, so the interval is wider
    assert diff.population.low < 0.2 < diff.population.high and diff.population.method == "two-way"
    # Acc@t1 difference: +2, +2, +4 problems of 20 -> +0.1, +0.1, +0.2 per seed
    acc1 = next(c for c in an.comparisons if c.metric == "acc_t1")
    half = T_975_2 * np.std([0.1, 0.1, 0.2], ddof=1) / math.sqrt(3)
    assert acc1.diff.mean == pytest.approx(4 / 30) and acc1.diff.high == pytest.approx(4 / 30 + half, abs=1e-6)
    assert acc1.role == "secondary" and acc1.verdict.startswith("no detectable difference (Holm-adjusted p = ")
    # GRPO's change over training in Acc@t2: end 0.5/0.6/0.7 against 0.4 at the start -> +0.1/+0.2/+0.3
    change = next(c for c in an.changes if c.a == "grpo" and c.metric == "acc_t2")
    half = T_975_2 * 0.1 / math.sqrt(3)
    assert change.diff.mean == pytest.approx(0.2) and change.diff.low == pytest.approx(0.2 - half, abs=1e-6)
    assert change.verdict.startswith("no detectable change (Holm-adjusted p = ")

    out = tmp_path / "out"
    md = (out / "report.md").read_text()
    assert line in md and "## Paired differences" in md and "60.0 ± 24.8" in md
    assert "(n = 3 seeds: 0, 1, 2)" in md and "`trainer.threads`" not in md
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page  # held-out curves + transitions
    assert (out / "heldout.png").stat().st_size > 0 and (out / "transitions.png").stat().st_size > 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["groups"]["grpo"]["end"]["acc_t2"]["mean"] == pytest.approx(0.6)


def test_unfinished_runs_are_listed_and_left_out(sweep, tmp_path):
    _train_run(sweep / "6", "grpo", 3, (0, 0), finished=False)
    (sweep / "7" / ".hydra").mkdir(parents=True)
    (sweep / "7" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"task_name": "train", "seed": 4}))
    (sweep / "7" / "status.json").write_text(json.dumps({"status": "FAILED", "error": "CUDA out of memory",
                                                         "mlflow_run_id": None}))
    rep = make_report([str(sweep)], out=tmp_path / "o", log_mlflow=False, n_resamples=500)
    assert [g.seeds for g in rep.analysis.grouping.groups] == [[0, 1, 2], [0, 1, 2]]
    md = (tmp_path / "o" / "report.md").read_text()
    assert "`multirun/6`: not finished (no status.json, no result.json)" in md
    assert "`multirun/7`: FAILED: CUDA out of memory" in md


def test_eval_runs_get_intervals_over_problems(tmp_path):
    root = tmp_path / "evals"
    for job, (model, n_right) in enumerate((("/runs/A/export", 12), ("/runs/B/export", 16))):
        folder = root / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
            {"task_name": "eval", "seed": 0, "rescore": None, "model": {"name": "tiny", "path": model},
             "dataset": {"name": "gsm8k"}, "eval": {"split": "test"}, "logger": {"enabled": False}}))
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model.path={model}"]))
        (folder / "summary.json").write_text("{}")
        (folder / "problems.jsonl").write_text("".join(
            json.dumps({"id": pid, "correct": [i < n_right], "t2_correct": i < n_right + 1, "answers": ["1"]}) + "\n"
            for i, pid in enumerate(IDS)))
    rep = make_report([str(root)], out=tmp_path / "o", log_mlflow=False, n_resamples=2000)
    an = rep.analysis
    assert [g.label for g in an.grouping.groups] == ["A/export", "B/export"]  # paths cut to what tells them apart
    a = an.end["A/export"]["acc_t1"]  # one run: t-interval over its 20 problems, 12 right
    half = T_975_19 * math.sqrt(0.6 * 0.4 * 20 / 19) / math.sqrt(20)
    assert a.mean == pytest.approx(0.6) and a.n == P and a.high - a.mean == pytest.approx(half, abs=1e-6)
    diff = next(c for c in an.comparisons if c.metric == "acc_t1")
    assert diff.diff.mean == pytest.approx(0.2) and diff.n_seeds == 1 and not an.changes
    assert diff.line().startswith("B/export Acc@t1 − A/export Acc@t1 = +20.0 [")


def test_groups_differing_in_two_keys_are_not_comparable(tmp_path):
    root = tmp_path / "m"
    _train_run(root / "0", "grpo", 0, (4, 5), extra={"grpo.lr": 0.1}, overrides=["layer=grpo", "grpo.lr=0.1"])
    _train_run(root / "1", "mgrpo", 0, (4, 5), extra={"grpo.lr": 0.2}, overrides=["layer=mgrpo", "grpo.lr=0.2"])
    with pytest.raises(ReportError, match="share no comparable key"):
        make_report([str(root)], out=tmp_path / "o", log_mlflow=False)


def test_cli_errors_are_one_line(tmp_path, sweep):
    unfinished = tmp_path / "unfinished"
    _train_run(unfinished / "0", "grpo", 0, (0, 0), finished=False)
    _train_run(unfinished / "1", "mgrpo", 0, (0, 0), finished=False)
    other_data = tmp_path / "datasets"
    _train_run(other_data / "0", "grpo", 0, (4, 5), extra={"dataset.name": "gsm8k"},
               overrides=["layer=grpo", "dataset=gsm8k"])
    _train_run(other_data / "1", "grpo", 0, (4, 5), overrides=["layer=grpo", "dataset=arith"])
    cases = [((str(unfinished),), "no finished runs with per-problem results"),
             ((str(other_data),), "runs evaluate different problem sets (dataset = arith, gsm8k)"),
             ((str(tmp_path / "empty-nope"), "--tracking-uri", f"sqlite:///{tmp_path}/none.db"), "no MLflow store"),
             ((str(sweep / "0" / "result.json"),), "not a folder")]
    for args, needle in cases:
        res = run_cli("report", *args, "--no-mlflow", timeout=120)
        assert res.returncode == 2, res.stdout + res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in res.stderr, res.stderr


def test_report_from_an_mlflow_experiment_logs_to_the_sweeps_parent_run(tmp_path):
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("study", artifact_location=(tmp_path / "mlartifacts").as_uri())
    parent = client.create_run(exp, tags={"mgrpo.kind": "sweep"}).info.run_id
    for layer, ends in (("grpo", GRPO_END), ("mgrpo", MGRPO_END)):
        for seed in (0, 1):
            run = client.create_run(exp, tags={"mlflow.parentRunId": parent,
                                               "overrides": f"layer={layer} seed={seed}"}).info.run_id
            for k, v in {"task_name": "train", "seed": seed, "layer.name": layer, "dataset.name": "arith",
                         "eval.split": "test", "eval.limit": None}.items():
                client.log_param(run, k, v)
            depths = (1, 2) if layer == "mgrpo" else (1,)
            client.log_batch(run, metrics=[Metric(f"train/layer{d}/{m}", 0.1 * d + 0.01 * step + 0.05 * seed, 0, step)
                                           for d in depths for m in ("reward_mean", "kl") for step in range(1, 11)])
            folder = tmp_path / "files" / run
            for step, rows in ((0, _rows(6, 8)), (10, _rows(*ends[seed]))):
                client.log_artifact(run, str(write_rows(step_file(folder, step), rows)), "heldout")
            client.set_terminated(run)
    failed = client.create_run(exp).info.run_id
    client.set_terminated(failed, "FAILED")

    rep = make_report(["study"], out=tmp_path / "out", tracking_uri=uri, n_resamples=500)
    an = rep.analysis
    assert [(g.label, g.seeds) for g in an.grouping.groups] == [("grpo", [0, 1]), ("mgrpo", [0, 1])]
    assert an.end["grpo"]["acc_t2"].mean == pytest.approx(0.55)
    half = 12.706205 * (0.1 / math.sqrt(2)) / math.sqrt(2)  # t(0.975, 1) * s / sqrt(n), s of (0.5, 0.6)
    assert an.end["grpo"]["acc_t2"].high == pytest.approx(0.55 + half, abs=1e-5)
    assert (tmp_path / "out" / "training.png").stat().st_size > 0
    assert f"`{failed}`: FAILED" in (tmp_path / "out" / "report.md").read_text()
    assert rep.mlflow.endswith(f"parent run {parent}, artifacts report/")
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/report.html", "report/training.png"} <= logged


# ----------------------------------------------------------------------- conditional rates, 2 × 2

# end counts per run (right→right, right→wrong, wrong→right, wrong→wrong) of 20 problems; the t1-right
# and t1-wrong counts (the rates' denominators) differ between runs
RATE_ENDS = {("grpo", 0): (8, 2, 3, 7), ("grpo", 1): (5, 3, 6, 6),
             ("mgrpo", 0): (12, 1, 4, 3), ("mgrpo", 1): (9, 0, 5, 6)}


def _rows_by_counts(rr: int, rw: int, wr: int, ww: int) -> list[ProblemResult]:
    pairs = [(True, True)] * rr + [(True, False)] * rw + [(False, True)] * wr + [(False, False)] * ww
    assert len(pairs) == P
    return [ProblemResult(pid, a, b, "1", "1") for pid, (a, b) in zip(IDS, pairs, strict=True)]


def _brute_ratio_bootstrap(parts, n: int = 20_000) -> tuple[float, float]:
    """sum_k w_k · sum(num_k)/sum(den_k) on seeds × problems resamples (the same indices for every part)."""
    rng = np.random.default_rng(7)
    n_seeds, n_problems = parts[0][1].shape
    s = rng.integers(0, n_seeds, (n, n_seeds))[:, :, None]
    p = rng.integers(0, n_problems, (n, n_problems))[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a denominator: dropped
        values = sum(w * num[s, p].sum(axis=(1, 2)) / den[s, p].sum(axis=(1, 2)) for w, num, den in parts)
    values = values[np.isfinite(values)]
    return float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))


def _rate_matrices(layer: str, rate: str):
    num, den = [], []
    for seed in (0, 1):
        rows = _rows_by_counts(*RATE_ENDS[(layer, seed)])
        t1 = np.array([r.t1 for r in rows], dtype=float)
        t2 = np.array([r.t2 for r in rows], dtype=float)
        num.append((1 - t1) * t2 if rate == "fix_rate" else t1 * (1 - t2))
        den.append(1 - t1 if rate == "fix_rate" else t1)
    return np.stack(num), np.stack(den)


def test_fix_and_break_rates_match_counts_by_hand(tmp_path):
    root = tmp_path / "sweep2x2"
    for job, ((layer, seed), counts) in enumerate(RATE_ENDS.items()):
        folder = root / str(job)
        _train_run(folder, layer, seed, (0, 0))
        write_rows(step_file(folder, 10), _rows_by_counts(*counts))  # the end, replacing the placeholder
    rep = make_report([str(root)], out=tmp_path / "out", log_mlflow=False, n_resamples=4000)
    an = rep.analysis
    assert [g.seeds for g in an.grouping.groups] == [[0, 1], [0, 1]]
    # per seed: fixed / t1-wrong and broken / t1-right; a group's rate is the mean over its seeds
    fix = {"grpo": (3 / 10, 6 / 12), "mgrpo": (4 / 7, 5 / 11)}
    brk = {"grpo": (2 / 10, 3 / 8), "mgrpo": (1 / 13, 0 / 9)}
    t_1 = 12.706205  # t(0.975, 1): two seeds
    for rate, per_seed in (("fix_rate", fix), ("break_rate", brk)):
        for layer, (s0, s1) in per_seed.items():
            g = an.end[layer][rate]
            half = t_1 * abs(s0 - s1) / math.sqrt(2) / math.sqrt(2)  # s of two values = |a - b| / sqrt(2)
            assert g.mean == pytest.approx((s0 + s1) / 2, abs=1e-12) and g.method == "t"
            assert g.high - g.mean == pytest.approx(half, rel=1e-6)  # t(0.975, 1) to 7 digits
        c = next(c for c in an.comparisons if c.metric == rate)
        d0, d1 = per_seed["mgrpo"][0] - per_seed["grpo"][0], per_seed["mgrpo"][1] - per_seed["grpo"][1]
        assert c.diff.mean == pytest.approx((d0 + d1) / 2, abs=1e-12) and c.diff.method == "t"
        assert c.diff.high - c.diff.mean == pytest.approx(t_1 * abs(d0 - d1) / 2, rel=1e-6)
        assert c.role == "secondary" and "Holm-adjusted p = " in c.verdict
    # the start (_rows(6, 8) in every run): 2 of the 14 t1-wrong fixed, none of the 6 t1-right broken
    assert an.start["grpo"]["fix_rate"].mean == pytest.approx(2 / 14, abs=1e-12)
    assert an.start["mgrpo"]["break_rate"].mean == 0.0
    change = next(c for c in an.changes if c.a == "grpo" and c.metric == "fix_rate")
    assert change.diff.mean == pytest.approx(0.4 - 2 / 14, abs=1e-12)
    broke = next(c for c in an.comparisons if c.metric == "break_rate")
    diff = sum(brk["mgrpo"]) / 2 - sum(brk["grpo"]) / 2
    assert broke.line().startswith(f"mgrpo break rate − grpo break rate = {100 * diff:+.1f} [")
    # Δi→c and Δc→i count the same problems as the rates: no verdict of their own
    assert next(c for c in an.comparisons if c.metric == "delta_c2i").verdict.startswith("no verdict of its own")

    md = (tmp_path / "out" / "report.md").read_text()
    assert broke.line() in md and "| fix rate |" in md and "share of the t1-wrong problems right at t2" in md
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["groups"]["mgrpo"]["end"]["fix_rate"]["mean"] == pytest.approx((4 / 7 + 5 / 11) / 2)
    assert {c["metric"] for c in saved["comparisons"]} >= {"fix_rate", "break_rate"}


def test_a_single_run_rate_gets_the_bootstrap_over_its_problems():
    from mgrpo_cli.reporting.stats import crossed_bootstrap_ratio

    num_a, den_a = _rate_matrices("grpo", "fix_rate")
    num_b, den_b = _rate_matrices("mgrpo", "fix_rate")
    parts = [(1.0, num_b[:1], den_b[:1]), (-1.0, num_a[:1], den_a[:1])]  # seed 0 of each
    iv = crossed_bootstrap_ratio(parts, n_resamples=4000)
    low, high = _brute_ratio_bootstrap(parts)
    assert iv.mean == pytest.approx(4 / 7 - 3 / 10) and iv.n == P
    assert iv.low == pytest.approx(low, abs=0.03) and iv.high == pytest.approx(high, abs=0.03)


def test_ratio_bootstrap_of_a_rate_without_denominator_is_undefined():
    from mgrpo_cli.reporting.stats import crossed_bootstrap_ratio

    iv = crossed_bootstrap_ratio([(1.0, np.zeros((2, 5)), np.zeros((2, 5)))], n_resamples=100)
    assert math.isnan(iv.mean) and not iv.defined


# ------------------------------------------------------------------------------- reward vanishing

def _history(zv1: list[float], zv2: list[float] | None = None, groups2: list[float] | None = None):
    h = {"train/layer1/zero_variance_groups": list(enumerate(zv1, 1)),
         "train/layer1/groups": [(s, 4.0) for s in range(1, len(zv1) + 1)]}
    if zv2 is not None:
        h["train/layer2/zero_variance_groups"] = list(enumerate(zv2, 1))
        h["train/layer2/groups"] = list(enumerate(groups2 or [2.0] * len(zv2), 1))
    return h


def test_run_vanishing_counts_steps_by_hand():
    from mgrpo_cli.reporting.analysis import run_vanishing

    # layer 1 has no usable group at steps 2 and 4; layer 2 has one at step 2, none at step 4 (0 groups)
    got = run_vanishing(_history([0.5, 1.0, 0.25, 1.0], [1.0, 0.5, 1.0, 0.0], [2, 2, 2, 0]))
    assert got == {"zero_variance/layer1": 0.6875, "zero_variance/layer2": 0.625,
                   "no_usable/layer1": 0.5, "no_usable/all": 0.25}
    assert run_vanishing(_history([1.0, 0.0])) == {"zero_variance/layer1": 0.5, "no_usable/layer1": 0.5,
                                                   "no_usable/all": 0.5}
    assert run_vanishing({}) == {}


def test_report_measures_reward_vanishing_per_group(sweep, tmp_path):
    from mgrpo_cli.cli.report import make_report as report_with_history
    from mgrpo_cli.reporting import load

    zv1 = {("grpo", 0): [1.0, 1.0, 0.5, 0.5], ("grpo", 1): [1.0, 1.0, 0.5, 0.5], ("grpo", 2): [1.0, 1.0, 1.0, 0.5],
           ("mgrpo", 0): [1.0, 0.5, 0.5, 0.5], ("mgrpo", 1): [0.5, 0.5, 0.5, 0.5], ("mgrpo", 2): [1.0, 1.0, 0.5, 0.5]}
    original = load.attach_mlflow

    def attach(runs, notes):  # the per-step history a run would bring from MLflow
        original(runs, notes)
        for r in runs:
            layer = r.config["layer.name"]
            r.history = _history(zv1[(layer, r.seed)], [0.25] * 4 if layer == "mgrpo" else None)

    load.attach_mlflow = attach
    try:
        rep = report_with_history([str(sweep)], out=tmp_path / "out", log_mlflow=False, n_resamples=500)
    finally:
        load.attach_mlflow = original
    v = rep.analysis.vanishing
    # grpo: layer-1 means 0.75, 0.75, 0.875; steps without a usable layer-1 group 2/4, 2/4, 3/4
    assert v["grpo"]["zero_variance/layer1"].mean == pytest.approx((0.75 + 0.75 + 0.875) / 3)
    half = T_975_2 * np.std([0.5, 0.5, 0.75], ddof=1) / math.sqrt(3)
    nu = v["grpo"]["no_usable/layer1"]
    assert nu.mean == pytest.approx(7 / 12) and nu.high - nu.mean == pytest.approx(half, abs=1e-6) and nu.n == 3
    assert "zero_variance/layer2" not in v["grpo"] and v["mgrpo"]["zero_variance/layer2"].mean == 0.25
    # mgrpo: layer 2 always has a usable group, so no step is without one
    assert v["mgrpo"]["no_usable/layer1"].mean == pytest.approx((1 + 0 + 2) / 12)
    assert v["mgrpo"]["no_usable/all"].mean == 0.0 and v["grpo"]["no_usable/all"].mean == pytest.approx(7 / 12)
    # paired by seed: mgrpo − grpo of the steps with no usable group in any layer: -2/4, -2/4, -3/4
    c = next(c for c in rep.analysis.vanishing_comparisons if c.key == "no_usable/all")
    half = T_975_2 * np.std([0.5, 0.5, 0.75], ddof=1) / math.sqrt(3)
    assert c.diff.mean == pytest.approx(-7 / 12) and c.diff.high == pytest.approx(-7 / 12 + half, abs=1e-6)
    assert c.verdict == "better (interval excludes 0)" and c.n_seeds == 3
    out = tmp_path / "out"
    md = (out / "report.md").read_text()
    assert "## Reward vanishing" in md and c.line() in md and "| steps where layer 1 had no usable group | 58.3 ± " in md
    assert (out / "vanishing.png").read_bytes().startswith(b"\x89PNG")
    saved = json.loads((out / "report.json").read_text())["vanishing"]
    assert saved["groups"]["grpo"]["no_usable/layer1"]["mean"] == pytest.approx(7 / 12)


def test_study_table_is_generated_from_report_json(tmp_path):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("study_table", ROOT / "scripts" / "study_table.py")
    study_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study_table)
    root = tmp_path / "runs"
    for job, ((layer, seed), counts) in enumerate(RATE_ENDS.items()):
        _train_run(root / str(job), layer, seed, (0, 0))
        write_rows(step_file(root / str(job), 10), _rows_by_counts(*counts))
    study = tmp_path / "docs" / "study-demo"
    rep = make_report([str(root)], out=study, log_mlflow=False, n_resamples=500)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{study_table.BEGIN}\nold\n{study_table.END}\n\nafter\n")
    assert study_table.main([str(study), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{study_table.END}\n\nafter\n")
    row = next(line for line in text.splitlines() if line.startswith("| [demo](docs/study-demo/report.md)"))
    fix = next(c for c in rep.analysis.comparisons if c.metric == "fix_rate")
    d = fix.diff
    grpo, mgrpo = (3 / 10 + 6 / 12) / 2, (4 / 7 + 5 / 11) / 2  # the mean over seeds of each seed's fix rate
    assert f"{100 * grpo:.1f} / {100 * mgrpo:.1f}; {100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]" in row
    assert "| 2 × 20 |" in row
    primary = rep.analysis.primaries[0].diff  # Acc@t2, the t-interval over the two seeds
    assert f"| acc_t2: {100 * primary.mean:+.1f} [{100 * primary.low:+.1f}, {100 * primary.high:+.1f}]: " in row


def test_a_run_missing_from_its_mlflow_store_is_a_note_not_a_crash(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()  # an existing store that does not hold the runs
    root = tmp_path / "runs"
    for job, layer in enumerate(("grpo", "mgrpo")):
        _train_run(root / str(job), layer, 0, (8, 10),
                   extra={"logger.enabled": True, "logger.tracking_uri": uri})
        (root / str(job) / "status.json").write_text(json.dumps({"status": "FINISHED", "mlflow_run_id": "f" * 32}))
    rep = make_report([str(root)], out=tmp_path / "out", log_mlflow=False, n_resamples=200)
    assert not rep.analysis.vanishing
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"no MLflow run {'f' * 32} in {uri}; training curves left out" in md


def test_seeds_for_a_3_point_interval(sweep, tmp_path):
    from mgrpo_cli.reporting.analysis import seeds_needed

    # per-seed Acc@t2 differences of the first 3-seed study: +6.5, -1.5, +2.0 points (sd 4.01):
    # t(0.975, 8) · 4.01 / √9 = 3.08 > 3, t(0.975, 9) · 4.01 / √10 = 2.87 <= 3; for ±6: 4.98 at n = 5, 6.38 at 4
    sd = float(np.std([0.065, -0.015, 0.02], ddof=1))
    assert seeds_needed(sd) == 10 and seeds_needed(sd, half_width=0.06) == 5
    assert seeds_needed(math.nan) is None and seeds_needed(0.0) == 2
    rep = make_report([str(sweep)], out=tmp_path / "out", log_mlflow=False, n_resamples=200)
    c = next(c for c in rep.analysis.comparisons if c.metric == "acc_t1")  # +2, +2, +4 of 20 problems
    assert c.seed_sd == pytest.approx(np.std([0.1, 0.1, 0.2], ddof=1))
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["comparisons"]
    assert next(x for x in saved if x["metric"] == "acc_t2")["seeds_for_3_points"] == 2  # the same +4 on every seed
    assert "| sd over seeds | seeds for ±3 |" in (tmp_path / "out" / "report.md").read_text()


# ------------------------------------------------------------------ provenance, re-check files, run order

def _made_by(folder, commit: str, started: float, torch: str = "2.13.0"):
    (folder / "provenance.json").write_text(json.dumps(
        {"commit": commit, "dirty": False, "packages": {"torch": torch, "mgrpo": "0.1.0"}, "python": "3.11.7",
         "started": started, "resumes": []}))


def _answers(folder, step: int, rule) -> None:
    """Rewrite a held-out file with final answers: t1's is the problem's number when right, else "x";
    t2's likewise, or "y" when wrong for ``rule(i)``."""
    rows = read_rows(step_file(folder, step))
    write_rows(step_file(folder, step), [
        ProblemResult(r.id, r.t1, r.t2, str(i) if r.t1 else "x", str(i) if r.t2 else ("y" if rule(i) else "x"))
        for i, r in enumerate(rows)])


def test_report_gathers_provenance_warns_and_writes_recheck_files(sweep, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {
        "hydra": ["hydra.sweep.dir=multirun"], "task": ["layer=grpo,mgrpo", "seed=0,1,2"]}}}))
    for job in range(6):  # jobs 0-2 grpo (seeds 0-2), 3-5 mgrpo: every grpo run started first
        _made_by(sweep / str(job), "b" * 40 if job == 5 else "a" * 40, 1000.0 + 100 * job)
        _answers(sweep / str(job), 10, lambda i: i % 2 == 1)
    rep = make_report([str(sweep)], out=tmp_path / "out", log_mlflow=False, n_resamples=200)
    out = tmp_path / "out"
    saved = json.loads((out / "report.json").read_text())
    block = saved["provenance"]
    assert block["sweep_commands"] == ["mgrpo train -m hydra.sweep.dir=multirun layer=grpo,mgrpo seed=0,1,2"]
    first = block["runs"][0]
    assert (first["group"], first["seed"], first["commit"], first["started"]) == ("grpo", 0, "a" * 40,
                                                                                 "1970-01-01T00:16:40Z")
    assert first["overrides"] == ["layer=grpo", "seed=0", "trainer.threads=1"]
    assert rep.warnings == block["warnings"] == [
        "warning: the compared runs differ in what made them: commit (aaaaaaaaaa ×5, bbbbbbbbbb ×1)",
        "warning: `layer` is confounded with the runs' start time: every grpo run started before every mgrpo run "
        "(Mann–Whitney p = 0.1, 3 and 3 runs); sweep `seed` first (`-m seed=0,1,... layer=...`) so the groups "
        "alternate within each seed"]
    md = (out / "report.md").read_text()
    assert all(f"**{w}**" in md for w in rep.warnings) and "## Provenance" in md and "## Re-check files" in md
    # the answer-changed rate: t1 -> t2 flips change the answer, and wrong twice changes it on odd problems
    for g, ends in (("grpo", GRPO_END), ("mgrpo", MGRPO_END)):
        per_seed = [sum(1 for i in range(P) if (i < n1) != (i < n2) or (i >= max(n1, n2) and i % 2 == 1)) / P
                    for n1, n2 in ends.values()]
        assert rep.analysis.end[g]["changed"].mean == pytest.approx(sum(per_seed) / 3)
    assert "| answer changed |" in md
    # the re-check files: seeds × problems 0/1, and the script recomputes the primary interval from them
    files = saved["recheck"]["files"]
    assert sorted(files["grpo"]) == ["end", "start"] and sorted(files["grpo"]["end"]) == ["changed", "t1", "t2"]
    lines = (out / files["grpo"]["end"]["t2"]).read_text().splitlines()
    assert lines[0] == ",".join(["seed", *sorted(IDS)]) and len(lines) == 4
    seed1 = dict(zip(lines[0].split(","), lines[2].split(","), strict=True))
    assert seed1["seed"] == "1" and sum(int(seed1[i]) for i in IDS) == GRPO_END[1][1]
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "recheck.py"), str(out)], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "acc_t2: recomputed +20.00 [+20.00, +20.00]" in res.stdout
    assert res.stdout.rstrip().endswith("the same")


def test_alternating_runs_raise_no_order_warning_and_primary_is_chosen(sweep, tmp_path):
    for job in range(6):  # grpo seeds 0, 1, 2 at 0, 200, 400 s; mgrpo at 100, 300, 500: alternating
        _made_by(sweep / str(job), "a" * 40, 200.0 * (job % 3) + 100 * (job >= 3))
    rep = make_report([str(sweep)], out=tmp_path / "out", log_mlflow=False, n_resamples=200, primary="acc_t1")
    assert rep.warnings == []
    assert [c.metric for c in rep.analysis.primaries] == ["acc_t1"]
    assert "acc_t2" in [c.metric for c in rep.analysis.secondaries]
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["primary"]["metric"] == "acc_t1" and saved["primary"]["comparisons"][0]["a"] == "grpo"
    with pytest.raises(ReportError, match="--primary nope: not a metric of these runs"):
        make_report([str(sweep)], out=tmp_path / "o2", log_mlflow=False, primary="nope")
