"""``mgrpo <command> [hydra overrides]``: pick the command's ``@hydra.main`` and hand it the rest.

Hydra has no subcommands; removing the command word from ``sys.argv`` keeps everything Hydra users
expect (``-m`` sweeps, ``--cfg job``, ``--help``, run folders). No torch import happens here, so
``mgrpo`` alone answers at once.
"""
from __future__ import annotations

import os
import sys

USAGE = """usage: mgrpo <command> [key=value ...] [-m] [--cfg job] [--help] | mgrpo --version

commands:
  train   train a policy with GRPO / MGRPO          (mgrpo train model=qwen1.5b layer=grpo)
  eval    score a model on a dataset, t1 and t2     (mgrpo eval dataset=gsm8k model.path=DIR)
  report  compare the runs of a sweep, with intervals (mgrpo report outputs/train/multiruns/<sweep>)
  data    fill the data folder from the Hub            (mgrpo data gsm8k math500; alone: what it holds)
  sync    send what a run kept while MLflow was away  (mgrpo sync outputs/train/runs/<run>)

examples:
  mgrpo train                                  # the embedded tiny model on arith, MGRPO, ~5 min on 2 CPU cores
  mgrpo train -m seed=0,1 layer=grpo,mgrpo     # a sweep: 4 runs
  mgrpo train resume=outputs/train/runs/<run>  # continue a stopped run exactly
  mgrpo train --cfg job                        # print the composed config
  mgrpo eval dataset=math500 checkpoint=outputs/train/runs/<run>/checkpoints/last.ckpt
  mgrpo eval rescore=outputs/eval/runs/<run>/problems.jsonl
  mgrpo report outputs/train/multiruns/<sweep>  # report.md/.html: groups, 95% intervals, verdicts
"""

COMMANDS = {"train": "mgrpo_cli.cli.train", "eval": "mgrpo_cli.cli.evaluate", "report": "mgrpo_cli.cli.report",
            "data": "mgrpo_cli.cli.data", "sync": "mgrpo_cli.cli.sync"}
# Lightning's DDP launcher starts ranks 1..n-1 as `python <argv[0]> <argv[1:]>` (or `python -m
# mgrpo_cli.__main__ <argv[1:]>`), i.e. with the overrides but without the command word: the
# command travels to them in this variable (they also get LOCAL_RANK).
COMMAND_ENV = "MGRPO_COMMAND"


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv if argv is None else argv)
    relaunched = os.environ.get(COMMAND_ENV) if "LOCAL_RANK" in os.environ else None
    if relaunched in COMMANDS and (len(argv) < 2 or argv[1] not in COMMANDS):
        argv = [argv[0], relaunched, *argv[1:]]
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[1] in ("--version", "-V"):
        from mgrpo_cli import __version__

        print(f"mgrpo {__version__}")
        return 0
    command = argv[1]
    if command not in COMMANDS:
        print(f"mgrpo: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    import importlib

    try:
        module = importlib.import_module(COMMANDS[command])
    except FileNotFoundError as e:  # conf/ not found
        print(e, file=sys.stderr)
        return 2
    for arg in argv[2:]:  # Hydra makes the run folder before the command runs: check where it goes first
        key, _, value = arg.partition("=")
        if key in ("paths.outputs", "++paths.outputs") and value and "," not in value:
            from mgrpo_cli.config.rules import check_writable
            from mgrpo_cli.errors import UserError

            try:
                check_writable(value, "paths.outputs")
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
    from mgrpo_cli.cli import hydra_errors

    hydra_errors.install()  # Hydra's composition errors as one line, exit 2
    os.environ[COMMAND_ENV] = command
    # a runnable argv[0] (the console script, or this file under -m) lets the DDP launcher start the other ranks
    sys.argv = [argv[0] if os.path.isfile(argv[0]) else f"mgrpo {command}", *argv[2:]]
    module.main()  # a sweep whose jobs failed ends in its callback: their list and exit code 1 (reporting.sweep)
    return None


if __name__ == "__main__":
    sys.exit(main())
