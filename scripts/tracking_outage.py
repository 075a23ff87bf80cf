"""A training run whose MLflow server goes away and comes back, against one whose server stays up.

    python scripts/tracking_outage.py --steps 300 --kill-at 20 --restart-at 150 --out /tmp/outage

Starts two real ``mlflow server`` processes on 127.0.0.1 (SQLite stores, free ports) and two ``mgrpo
train debug=fast`` runs side by side (the same load on both), one per server. The troubled run's
server is SIGKILLed once that run has logged step ``--kill-at`` and started again (same port, same
store) once it has logged step ``--restart-at``; ``--restart-at 0`` never starts it again (then the
run must end FINISHED on disk, saying what is unsent, and ``mgrpo sync`` sends it after the server is
back). The runs' steps are read from their outboxes (``<run>/tracking/outbox.jsonl``), which the
run writes whatever the server does.

Prints one JSON object: each run's wall time and exit code, and what the troubled run's MLflow store
holds afterwards (status, the steps of ``train/step_time``, the rows of the samples table) next to
the untroubled run's, plus the lines the troubled run printed about tracking.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

EXE = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` over ``folder/mlflow.db``, up and answering."""
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner processes
    proc = subprocess.Popen([str(EXE / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                             "--default-artifact-root", (folder / "mlartifacts").as_uri(), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=open(folder / "server.log", "a"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def logged_step(run: Path) -> int:
    """The last training step the run has logged (its outbox), -1 before the first."""
    try:
        lines = (run / "tracking" / "outbox.jsonl").read_bytes().splitlines()
    except FileNotFoundError:
        return -1
    steps = [-1]
    for line in lines[-200:]:
        try:
            op = json.loads(line)
        except ValueError:
            continue
        if op.get("op") == "metrics" and "train/step_time" in op["metrics"]:
            steps.append(op["step"])
    return max(steps)


def start_run(folder: Path, port: int, steps: int, extra: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="120")
    return subprocess.Popen([str(EXE / "mgrpo"), "train", "debug=fast", f"trainer.max_steps={steps}", *extra,
                             f"logger.tracking_uri=http://127.0.0.1:{port}", f"paths.outputs={folder}",
                             f"hydra.run.dir={folder / 'run'}"],
                            stdout=open(folder / "train.out", "w"), stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def store(db: Path, outputs: Path) -> dict:
    with sqlite3.connect(db) as con:
        runs = con.execute("select run_uuid, status from runs").fetchall()
        steps = sorted(s for (s,) in con.execute("select distinct step from metrics where key = 'train/step_time'"))
        keys = con.execute("select count(distinct key) from metrics").fetchone()[0]
    samples = 0
    if len(runs) == 1:
        table = outputs / "mlartifacts" / runs[0][0] / "artifacts" / "samples.json"
        table = table if table.is_file() else None
        samples = len(json.loads(table.read_text())["data"]) if table else 0
    return {"runs": [status for _, status in runs], "steps": len(steps), "first_step": steps[0] if steps else None,
            "last_step": steps[-1] if steps else None, "metric_keys": keys, "sample_rows": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kill-at", type=int, default=20)
    parser.add_argument("--restart-at", type=int, default=150, help="0: the server never comes back during the run")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="more mgrpo train overrides for both runs")
    args = parser.parse_args()
    calm, troubled = args.out / "calm", args.out / "troubled"
    ports = free_port(), free_port()
    servers = {"calm": start_server(calm / "server", ports[0]), "troubled": start_server(troubled / "server", ports[1])}
    started = time.monotonic()
    runs = {"calm": start_run(calm, ports[0], args.steps, args.overrides),
            "troubled": start_run(troubled, ports[1], args.steps, args.overrides)}
    ended: dict[str, float] = {}
    events = []
    try:
        while len(ended) < 2:
            for name, proc in runs.items():
                if name not in ended and proc.poll() is not None:
                    ended[name] = time.monotonic() - started
            step = logged_step(troubled / "run")
            if "killed" not in dict(events) and step >= args.kill_at:
                kill(servers["troubled"])
                events.append(("killed", step))
            elif args.restart_at and "killed" in dict(events) and "restarted" not in dict(events) \
                    and step >= args.restart_at:
                servers["troubled"] = start_server(troubled / "server", ports[1])
                events.append(("restarted", logged_step(troubled / "run")))
            time.sleep(0.2)
        synced = None
        if not args.restart_at:  # the server comes back after the run: mgrpo sync sends what was kept
            servers["troubled"] = start_server(troubled / "server", ports[1])
            sync = subprocess.run([str(EXE / "mgrpo"), "sync", str(troubled / "run")], capture_output=True, text=True)
            synced = {"exit": sync.returncode, "output": (sync.stdout + sync.stderr).strip()}
    finally:
        for proc in list(servers.values()) + list(runs.values()):
            if proc.poll() is None:
                kill(proc)
    said = [line.strip() for line in (troubled / "train.out").read_text().splitlines() if "tracking" in line]
    print(json.dumps({
        "steps": args.steps, "events": events,
        "seconds": {name: round(t, 1) for name, t in ended.items()},
        "exit": {name: proc.returncode for name, proc in runs.items()},
        "status_json": {name: json.loads((folder / "run" / "status.json").read_text())["status"]
                        for name, folder in (("calm", calm), ("troubled", troubled))},
        "mlflow": {name: store(folder / "server" / "mlflow.db", folder) for name, folder in (("calm", calm),
                                                                                             ("troubled", troubled))},
        "tracking_lines": said, "sync": synced,
    }, indent=1))


if __name__ == "__main__":
    main()
