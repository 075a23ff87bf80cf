"""``mgrpo data [name ...] [key=value ...]``: fill the data folder from the Hub, e.g. before going offline.

Each named data set (``conf/dataset/<name>.yaml``) has its splits read as a run reads them: the user's
file, else ``<paths.data>/<name>/<split>.jsonl``, else the Hub, written to that file on the way. A file
already there is kept (delete it to load the split again). Every split is read through the data set's
field mapping, so a count of problems means a run will read them too. With no name, lists the data
sets, their Hub sets and what the data folder holds. Overrides (``paths.data=DIR``,
``dataset.hub_name=…``) apply to every name.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Optional

from mgrpo_cli.config.schema import conf_dir, register_configs
from mgrpo_cli.errors import EXIT_USER_ERROR, UserError


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    names = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    try:
        known = sorted(p.stem for p in (conf_dir() / "dataset").glob("*.yaml"))
        for name in names:
            if name.startswith("-") or name not in known:
                raise UserError(f"dataset={name}: not a data set of conf/dataset; known: {', '.join(known)}")
        if not names:
            for name in known:
                cfg = _compose(name, overrides)
                if cfg.dataset.kind != "arith":
                    print(_listing(cfg))
            return
        for name in names:
            cfg = _compose(name, overrides)
            if cfg.dataset.kind == "arith":
                print(f"{name}: the embedded task, made on the fly; nothing to download")
                continue
            for split in ("train", "test"):
                print(_fill(cfg, split))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def _compose(name: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mgrpo_cli.cli.hydra_errors import hydra_error_line
    from mgrpo_cli.errors import one_line

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[f"dataset={name}", *overrides])
        str(cfg.paths.data)  # resolves the data folder's interpolation
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(hydra_error_line(e) or f"{' '.join(overrides)}: {one_line(e)}") from None
    return cfg


def _fill(cfg: Any, split: str) -> str:
    from mgrpo_cli.cli import build
    from mgrpo_cli.data.loaders import data_folder_file, load_problems

    d = cfg.dataset
    if not d.get(f"{split}_path") and d.get(f"{split}_split") is None \
            and data_folder_file(cfg.paths.data, d.name, split) is None:
        return f"{d.name} {split}: none (the Hub set {d.hub_name} has no {split} split)"
    there = data_folder_file(cfg.paths.data, d.name, split) is not None or bool(d.get(f"{split}_path"))
    loaded = load_problems(build.dataset_spec(d), split, data_dir=cfg.paths.data)
    how = "already there" if there else f"from {d.hub_name}"
    skipped = f", {loaded.skipped} rows skipped" if loaded.skipped else ""
    return (f"{d.name} {split}: {len(loaded.problems)} problems in {loaded.source} ({how}{skipped})"
            f"{_source(cfg, split)}")


def _source(cfg: Any, split: str) -> str:
    """Where the data folder's split came from, as its sidecar records it ('' when it has none)."""
    from mgrpo_cli.data.loaders import split_source

    src = split_source(cfg.paths.data, cfg.dataset.name, split)
    if src is None:
        return ""
    config = f" config {src['hub_config']}" if src.get("hub_config") else ""
    return f"; source {src['hub_name']}{config} split {src['split']} revision {src.get('revision') or 'none (a local folder)'}"


def _listing(cfg: Any) -> str:
    from mgrpo_cli.data.loaders import data_folder_file

    d = cfg.dataset
    hub = d.hub_name + (f" (config {d.hub_config})" if d.hub_config else "") if d.hub_name else "no Hub set"
    splits = []
    for split in ("train", "test"):
        if d.get(f"{split}_split") is None:
            continue
        found = data_folder_file(cfg.paths.data, d.name, split)
        splits.append(f"{split}: {found if found else 'not in the data folder'}{_source(cfg, split)}")
    return f"{d.name:<14} {hub}; {'; '.join(splits)}"
