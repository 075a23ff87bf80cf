"""Two processes on CPU (gloo): the collectives, a real `mgrpo train trainer=ddp` run, and FSDP2.

The runs go through the real CLI in a subprocess (Lightning starts the second rank by re-running
the command). Each rank writes its weight checksums (``trainer.weight_checksums=true``). A random
tiny model earns no reward on arith, so the runs train on one-digit answers graded with the
last-number fallback: about one completion in ten is right, so groups have reward variance and the
two steps really change the weights.
"""
import json
import os
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import compose, run_cli

from mgrpo_cli.training import distributed

TWO_RANKS = ["debug=fast", "warmup.enabled=false", "logger=none", "trainer.accelerator=cpu", "trainer.devices=2",
             "trainer.precision=32-true", "trainer.threads=1", "trainer.weight_checksums=true",
             "reward.last_number_fallback=true", "grpo.num_generations=8", "model.max_completion_length=32",
             "grpo.beta=0.05"]


def _collectives(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    metrics = {"train/layer1/reward_mean": float(rank), "step_time": 1.0}
    if rank == 1:
        metrics["train/layer2/accuracy"] = 0.5  # a key only one rank logged
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    q = torch.nn.Parameter(torch.zeros(2))  # no gradient on rank 0
    if rank == 1:
        q.grad = torch.ones(2)
    distributed.all_reduce_grads([p, q], bucket_bytes=8)  # tiny buckets: several all-reduces
    result = {"metrics": distributed.mean_over_ranks(metrics), "rows": distributed.gather([rank] * (rank + 1)),
              "max": distributed.max_over_ranks(3 + rank), "p": p.grad.tolist(), "q": q.grad.tolist()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_collectives_average_metrics_gather_rows_and_gradients(tmp_path):
    mp.spawn(_collectives, args=(random.randint(20000, 40000), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert r0["metrics"] == {"train/layer1/reward_mean": 0.5, "step_time": 1.0, "train/layer2/accuracy": 0.5}
    assert r0["rows"] == [0, 1, 1] and r0["max"] == 4
    assert r0["p"] == [1.5] * 3 and r0["q"] == [0.5] * 2


def load_file(path: Path) -> dict:
    from safetensors.torch import load_file as load

    return load(path)


def _train_two_ranks(strategy: str, out: Path, digits: list[str], *extra: str) -> Path:
    res = run_cli("train", f"trainer={strategy}", *TWO_RANKS, *digits, f"paths.outputs={out}", *extra, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run,) = (out / "train" / "runs").iterdir()
    return run


def _checksums(run: Path) -> list[dict]:
    return [json.loads((run / "checksums" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, digits) -> Path:
    return _train_two_ranks("ddp", tmp_path_factory.mktemp("ddp"), digits)


def test_ddp_two_ranks_take_two_steps_and_end_with_identical_weights(ddp_run):
    r0, r1 = _checksums(ddp_run)
    assert (r0["world_size"], r0["global_step"], r1["global_step"]) == (2, 2, 2)
    assert r0["start"] == r1["start"] and r0["end"] != r0["start"]  # same start, and the steps changed it
    assert r0["params"] == r1["params"]  # every tensor identical on both ranks
    assert (ddp_run / "export" / "model.safetensors").is_file() and (ddp_run / "checkpoints" / "last.ckpt").is_file()
    assert (ddp_run / "train_ddp_process_1.log").is_file()  # rank 1 ran in the same run folder


def test_eval_exports_the_ddp_checkpoint_as_the_run_exported_it(ddp_run, tmp_path):
    from mgrpo_cli.cli.evaluate import run_eval

    run_eval(compose("eval", ["logger=none", f"paths.outputs={tmp_path}", "dataset=arith",
                              f"checkpoint={ddp_run / 'checkpoints' / 'last.ckpt'}", f"export_to={tmp_path / 'x'}"]))
    a, b = load_file(ddp_run / "export" / "model.safetensors"), load_file(tmp_path / "x" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_run_matches_ddp(ddp_run, tmp_path, digits):
    """Same seeds, same prompts per rank: sharded training (FSDP2) ends where data-parallel training does."""
    run = _train_two_ranks("fsdp", tmp_path, digits)
    r0, r1 = _checksums(run)
    assert (r0["global_step"], r1["global_step"]) == (2, 2) and r0["end"] != r0["start"]
    fsdp, ddp = load_file(run / "export" / "model.safetensors"), load_file(ddp_run / "export" / "model.safetensors")
    assert fsdp.keys() == ddp.keys()
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=0, atol=1e-5)


def test_fsdp2_lora_run_trains_only_the_adapter_with_the_disabled_adapter_as_reference(tmp_path, digits):
    run = _train_two_ranks("fsdp", tmp_path, digits, "lora=default")
    r0, r1 = _checksums(run)
    assert (r0["global_step"], r1["global_step"]) == (2, 2) and r0["params"] == r1["params"]
    changed = {k for k, v in r0["params"].items() if k != "__all__" and v != r0["params_start"][k]}
    assert changed and all("lora_" in k for k in changed)
    assert (run / "export" / "model.safetensors").is_file()  # merged by default


# `mgrpo train` whose rank 1 dies (exit code 3) in its second training step while rank 0 is busy outside
# any collective (as in a long generation), so Lightning's launcher SIGKILLs rank 0 before a collective
# could raise; Lightning re-runs this script for rank 1, so both ranks carry the patch
_RANK_1_DIES = """
import os, sys, time
from mgrpo_cli.training.module import MGRPOModule
step = MGRPOModule.training_step
def training_step(self, batch, batch_idx):
    if self.global_rank == 1 and self.trainer.global_step == 1:
        os._exit(3)
    if self.global_rank == 0 and self.trainer.global_step == 1:
        time.sleep(120)
    return step(self, batch, batch_idx)
MGRPOModule.training_step = training_step
from mgrpo_cli.__main__ import main
sys.exit(main())
"""


def test_a_ddp_run_whose_other_rank_dies_ends_failed(tmp_path, digits):
    import sqlite3
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "rank_1_dies.py"
    script.write_text(_RANK_1_DIES)
    args = [a for a in TWO_RANKS if a != "logger=none"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", COLUMNS="120")
    res = subprocess.run([sys.executable, str(script), "train", "trainer=ddp", *args, *digits,
                          f"paths.outputs={tmp_path}", "trainer.max_steps=4"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode != 0
    (run,) = (tmp_path / "train" / "runs").iterdir()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "FAILED" and status["error"] == "rank 1 died (exit code 3)", res.stdout[-3000:] + res.stderr[-3000:]
    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        (mlflow_status, end), = con.execute("select status, end_time from runs").fetchall()
        (error,), = con.execute("select value from tags where key = 'error'").fetchall()
    assert mlflow_status == "FAILED" and end is not None and error == status["error"]
