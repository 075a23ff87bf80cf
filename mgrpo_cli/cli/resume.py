"""``mgrpo train resume=<run folder>``: continue a run in its own folder, with its saved config, its
last checkpoint and its MLflow run, to exactly where the uninterrupted run would have ended.

Two steps:
  * before Hydra composes anything, :func:`prepare_argv` checks the command line (one-line errors:
    no such run folder, ``-m``, an override that cannot change in the middle of a run) and points
    Hydra's run folder at the run's folder, without letting Hydra rewrite the run's ``.hydra/``;
  * in the task, :func:`resumed_config` reads the run's ``.hydra/config.yaml``, applies the overrides
    that are safe to change (:data:`SAFE_OVERRIDES`, e.g. ``trainer.max_steps`` to extend a run) and
    saves them there so a later ``resume=`` keeps them, and sets ``ckpt_path`` to
    the newest checkpoint that loads (``checkpoints/last.ckpt``, else ``last-1.ckpt``, ...:
    ``checkpointing.newest_loadable``; a run stopped before its first checkpoint starts again from where it
    started). The MLflow run id comes from the run's ``status.json`` (``mgrpo_cli.training.lifecycle``).

A resumed run continues exactly: the problems and every random draw of step s are functions of
(seed, s, rank) (``data.ProblemStream``, ``seeding``), and the checkpoint holds the weights, the
optimizer state, the step and the module's counters.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from mgrpo_cli.errors import UserError, bad_value

log = logging.getLogger(__name__)

# what may change when resuming, and why it is safe
SAFE_OVERRIDES = {
    "trainer.max_steps": "extend (or shorten) the run",
    "trainer.max_time": "a new wall-clock limit for the whole run (Lightning counts every leg's time)",
    "trainer.checkpoint_every": "checkpoint more or less often",
    "trainer.checkpoint_every_minutes": "checkpoint more or less often",
    "trainer.keep_checkpoints": "keep more or fewer checkpoints",
    "trainer.val_every": "validation changes no training step",
    "trainer.max_nonfinite_steps": "tolerate more or fewer skipped steps",
    "trainer.threads": "speed only (on CPU the last bits of the results follow the thread count)",
    "logger.samples_every": "logging only",
    "logger.samples_n": "logging only",
}
CHECKPOINT = Path("checkpoints") / "last.ckpt"


def key_of(token: str) -> str:
    """The key of a ``key=value`` override (``+``/``++``/``~`` dropped)."""
    return token.split("=", 1)[0].lstrip("+~")


def prepare_argv(args: list[str]) -> list[str]:
    """The command-line arguments of ``mgrpo train`` (after the command word), made ready for Hydra:
    unchanged without ``resume=``; with it, checked, and with Hydra's run folder set to the run's."""
    given = [a for a in args if "=" in a and not a.startswith("-") and key_of(a) == "resume"]
    if not given:
        return list(args)
    value = given[-1].split("=", 1)[1].strip("'\"")
    if any(a in ("-m", "--multirun") for a in args):
        raise UserError(f"resume={value}: resume= continues one run; drop -m")
    folder = Path(value).expanduser().resolve()
    if not (folder / ".hydra" / "config.yaml").is_file():
        raise bad_value("resume", value, "no mgrpo train run folder there (no .hydra/config.yaml); give a run's "
                                         "folder, e.g. outputs/train/runs/<date>_<time>")
    refused = [key_of(a) for a in args if "=" in a and not a.startswith("-")
               and key_of(a) != "resume" and not key_of(a).startswith("hydra.") and key_of(a) not in SAFE_OVERRIDES]
    if refused:
        raise UserError(f"{refused[0]}: cannot change when resuming (resume={value} continues the run with its saved "
                        f"config); allowed with resume=: {', '.join(SAFE_OVERRIDES)}")
    # the run's folder is this job's folder; Hydra must not replace the run's .hydra/ record
    return [*args, f'hydra.run.dir="{folder}"', "hydra.output_subdir=null"]


def show_config(args: list[str]) -> Optional[str]:
    """For ``resume=<run> --cfg job|hydra|all`` (``-c``): what the resumed run will use, as YAML (the run's
    saved config with the safe overrides given, nothing saved); None for any other command line."""
    from omegaconf import OmegaConf

    given = [a for a in args if "=" in a and not a.startswith("-") and key_of(a) == "resume"]
    which = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--cfg", "-c")), None)
    if not given or which is None:
        return None
    value = given[-1].split("=", 1)[1].strip("'\"")
    overrides = [a for a in args if "=" in a and not a.startswith("-") and key_of(a) in SAFE_OVERRIDES]
    cfg = OmegaConf.from_dotlist([*overrides, f"resume={value}"])
    parts = []
    if which in ("job", "all"):
        parts.append(OmegaConf.to_yaml(resumed_config(cfg, overrides, is_global_zero=False)))
    if which in ("hydra", "all"):
        parts.append(OmegaConf.to_yaml(OmegaConf.load(Path(value).expanduser() / ".hydra" / "hydra.yaml")))
    if not parts:
        raise UserError(f"--cfg {which}: expected job, hydra or all")
    return "\n".join(parts)


def _relative_paths(cfg: Any, started_in: Path) -> list[str]:
    """``key=value`` of the config's paths that are relative to ``started_in`` (and exist there)."""
    from omegaconf import OmegaConf

    out = []
    for key in ("paths.outputs", "dataset.train_path", "dataset.test_path", "model.path", "ckpt_path"):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() \
                and (started_in / value).exists():
            out.append(f"{key}={value}")
    return out


def resumed_config(cfg: Any, given: list[str], *, is_global_zero: bool = True):
    """The run's saved config with the safe overrides of ``given`` (the command line's overrides, taken
    with their values from ``cfg``), ``resume`` = the folder and ``ckpt_path`` = its last checkpoint."""
    from omegaconf import OmegaConf

    from mgrpo_cli.config.schema import TrainAppConfig

    folder = Path(cfg.resume).expanduser().resolve()
    record = folder / ".hydra"
    try:
        saved = OmegaConf.load(record / "config.yaml")
        merged = OmegaConf.merge(OmegaConf.structured(TrainAppConfig), saved)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise bad_value("resume", cfg.resume, f"its saved config does not load ({first})") from None
    started_in = _started_in(record)
    if started_in is not None and started_in != Path.cwd().resolve():
        relative = _relative_paths(merged, started_in)
        if relative:
            raise bad_value("resume", cfg.resume, f"the run started in {started_in} and {relative[0]} is relative "
                                                  f"to it; run mgrpo train resume=... from {started_in}")
    changed = {}
    for key in dict.fromkeys(key_of(o) for o in given):
        if key in SAFE_OVERRIDES:
            value = OmegaConf.select(cfg, key)
            if OmegaConf.select(merged, key) != value:
                changed[key] = value
            OmegaConf.update(merged, key, value, merge=False)
    if changed and is_global_zero:
        OmegaConf.save(merged, record / "config.yaml")  # a later resume= keeps the new values
        log.info("resume: %s saved into %s", ", ".join(f"{k}={v}" for k, v in changed.items()), record / "config.yaml")
    merged.resume = str(folder)
    from mgrpo_cli.training.checkpointing import newest_loadable

    checkpoint = newest_loadable(folder / CHECKPOINT.parent, set_aside=is_global_zero)
    if checkpoint is not None:
        merged.ckpt_path = str(checkpoint)
    else:
        log.warning("resume: %s has no checkpoint yet; the run starts again from its beginning", folder)
    return merged


def _started_in(record: Path) -> Optional[Path]:
    """The working directory the run started in (Hydra's record), if known."""
    from omegaconf import OmegaConf

    try:
        cwd = OmegaConf.select(OmegaConf.load(record / "hydra.yaml"), "hydra.runtime.cwd")
    except Exception:
        return None
    return Path(cwd).resolve() if cwd else None

