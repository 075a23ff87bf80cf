"""Load a data set's problems: the embedded ``arith`` task, a JSON Lines / Parquet file, or a Hub set.

``load_problems(spec, split, data_dir)`` (``spec``: a :class:`DatasetSpec`, ``build.dataset_spec`` of
``dataset.*``; ``data_dir``: ``paths.data``) finds the split's rows, first found wins:

1. ``dataset.<split>_path``, the user's own file (``.jsonl``/``.json`` JSON Lines, or ``.parquet``);
   a relative path is taken from the current folder;
2. the data folder, ``<data_dir>/<dataset name>/<split>.jsonl`` (or ``.parquet``);
3. for ``kind: hub``, the Hub: ``datasets.load_dataset(hub_name, hub_config, split=<hub split>)``
   (``hub_name`` may be a local folder ``load_dataset`` reads), its columns renamed by ``hub_rename``
   and written once into the data folder as JSON Lines (a temporary file, then renamed), so later
   runs read that file and never ask the Hub. No file, no Hub (offline, unknown name): one line that
   names the data set and both ways out.

It then maps each row's fields through ``cfg.fields`` and reads the gold answer by ``cfg.answer_format``:

- ``answer``: the answer field as is (stripped);
- ``gsm8k``: the text after ``####`` of the answer field, commas removed (``grading.extract.extract_gold_gsm8k``);
- ``boxed``: the answer field when mapped and present, else the last ``\\boxed{}`` of the solution;
- ``list``: a list, or a Python-style list in a string, such as OlympiadBench's ``final_answer``
  (``['$x=3$', '$y=4$']``; read with ``ast.literal_eval``, never ``eval``): ``$`` delimiters removed,
  several answers (items, or ``$a$,$b$`` inside one item) joined with ``", "``.

A malformed row (bad JSON, not an object, blank question, no gold answer) raises :class:`DataError`
naming ``file:line`` under ``on_bad_row=error``, or is logged and counted under ``on_bad_row=skip``.
Left out: streaming (files are read whole) and answer normalisation (the grader's job).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Optional

from mgrpo_cli.config.schema import DATA_DIR_ENV, DEFAULT_DATA_DIR
from mgrpo_cli.data.problems import ArithTask, Problem
from mgrpo_cli.errors import UserError

log = logging.getLogger(__name__)

ARITH_TRAIN_DEFAULT = 10_000
# a list-valued gold longer than this is refused rather than parsed (it is data, but keep it bounded)
LIST_MAX_CHARS = 4_000

_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_DOLLAR_COMMA = re.compile(r"(?<!\\)\$\s*,\s*\$")
_LEVEL_NUMBER = re.compile(r"(?:level\s*)?(-?\d+)", re.IGNORECASE)


class DataError(UserError):
    """A data set cannot be read: the message names the file (and line) or config key at fault."""


@dataclass(frozen=True)
class DatasetSpec:
    """A data set as the loaders read it (``cli.build.dataset_spec`` makes it from ``dataset.*``)."""

    name: str  # also the data folder's subfolder: <data_dir>/<name>/<split>.jsonl
    kind: str  # arith | file | hub
    train_path: Optional[str]
    test_path: Optional[str]
    hub_name: Optional[str]
    hub_config: Optional[str]
    hub_revision: Optional[str]  # the Hub set's commit, tag or branch; None = its main branch
    train_split: Optional[str]  # the Hub's split name; None: the Hub set has no such split
    test_split: Optional[str]
    hub_rename: dict[str, str]  # the Hub's column names -> the names ``fields`` uses
    fields: dict[str, Optional[str]]  # question, answer, solution, subject, level, id -> the row's field
    answer_format: str  # answer | gsm8k | boxed | list
    on_bad_row: str  # error | skip
    arith: dict[str, Any]  # the embedded task's parameters (``ArithTask``)


@dataclass(frozen=True)
class Loaded:
    """The problems of one split, how many rows were skipped, and where they came from."""

    problems: list[Problem]
    skipped: int  # rows skipped under on_bad_row=skip (each logged with file:line and why)
    source: str  # the file read (the data folder's copy for a Hub set), or "arith:<split>"


class _BadRow(Exception):
    """A row that cannot become a Problem; the message is the reason (without file:line)."""


class _Missing(_BadRow):
    """The row has no value for the mapped field ``key``."""

    def __init__(self, key: str):
        super().__init__(f"missing field {key!r}")
        self.key = key


def load_problems(cfg: DatasetSpec, split: str, *, limit: Optional[int] = None, seed: Optional[int] = None,
                  data_dir: Optional[str | Path] = None) -> Loaded:
    """The problems of ``split`` ("train" or "test"; arith also "valid") of the data set ``cfg``.

    ``data_dir`` is the data folder
    (``paths.data``; None = :func:`default_data_dir`). ``limit`` keeps the first N usable rows, or with
    ``seed`` a seeded random sample of N (kept in file order).
    """
    name, kind = cfg.name, cfg.kind
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0, got {limit!r}")
    if kind == "arith":
        return _load_arith(cfg, split, limit, seed)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test' for dataset {name!r} (kind {kind!r}), got {split!r}")
    answer_format, on_bad_row = cfg.answer_format, cfg.on_bad_row
    fields = _field_map(cfg, answer_format)
    path = split_file(cfg, split, data_dir)
    source, rows = str(path), _read_file(path)

    problems, skipped, seen = [], 0, 0
    for line, row in rows:
        seen += 1
        try:
            problems.append(_problem(row, fields, answer_format, f"{name}-{split}-{line}"))
        except _BadRow as e:
            if on_bad_row == "error":
                raise DataError(f"{source}:{line}: {e}") from None
            log.warning("%s:%d: %s; row skipped (dataset.on_bad_row=skip)", source, line, e)
            skipped += 1
    if seen == 0:
        raise DataError(f"{source}: no rows (empty data set)")
    if not problems:
        raise DataError(f"{source}: no usable rows, all {skipped} skipped")
    if skipped:
        log.warning("%s: skipped %d of %d rows", source, skipped, seen)
    return Loaded(problems=_take(problems, limit, seed), skipped=skipped, source=source)


# --------------------------------------------------------------------------------------- sources


def _load_arith(cfg: DatasetSpec, split: str, limit: Optional[int], seed: Optional[int]) -> Loaded:
    params = dict(cfg.arith)
    try:
        task = ArithTask(**params)  # dataset seed stays 0: the held-out sets never move
    except TypeError as e:
        raise DataError(f"dataset.arith: {e}") from None
    if split == "train":
        n = ARITH_TRAIN_DEFAULT if limit is None else limit
        problems = list(islice(task.train_stream(seed), n))
    elif split in ("test", "valid"):
        problems = _take(list(getattr(task, split)), limit, seed)
    else:
        raise DataError(f"split must be 'train', 'test' or 'valid' for dataset arith, got {split!r}")
    return Loaded(problems=problems, skipped=0, source=f"arith:{split}")


def default_data_dir() -> Path:
    """The data folder when none is given: ``$MGRPO_DATA_DIR``, else ``~/.cache/mgrpo/data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def _data_dir(data_dir: Optional[str | Path]) -> Path:
    return default_data_dir() if data_dir is None or str(data_dir) == "" else Path(str(data_dir)).expanduser()


def data_folder_file(data_dir: Optional[str | Path], name: str, split: str) -> Optional[Path]:
    """``<data_dir>/<name>/<split>.jsonl`` (or ``.parquet``) when it exists, else None."""
    folder = _data_dir(data_dir) / name
    for suffix in (".jsonl", ".parquet"):
        if (folder / f"{split}{suffix}").is_file():
            return folder / f"{split}{suffix}"
    return None


def split_file(cfg: DatasetSpec, split: str, data_dir: Optional[str | Path] = None) -> Path:
    """The file holding ``split`` of ``cfg``: the user's ``<split>_path``, else the data folder's file,
    else (``kind: hub``) the Hub's split, written into the data folder first (:func:`fetch_split`)."""
    name, kind, key = cfg.name, cfg.kind, f"{split}_path"
    own = getattr(cfg, key)
    if own is not None and str(own).strip() != "":
        return _resolve_path(own, key)
    found = data_folder_file(data_dir, name, split)
    if found is not None:
        return found
    if kind == "hub":
        return fetch_split(cfg, split, data_dir)
    target = _data_dir(data_dir) / name / f"{split}.jsonl"
    raise DataError(f"dataset.{key} is not set for {name}, and there is no {target} (paths.data, or "
                    f"{DATA_DIR_ENV}, is the data folder)")


def fetch_split(cfg: DatasetSpec, split: str, data_dir: Optional[str | Path] = None) -> Path:
    """Load ``split`` of the Hub set of ``cfg`` through ``datasets.load_dataset``, rename its columns by
    ``hub_rename`` and write it to ``<data_dir>/<name>/<split>.jsonl`` (temporary file, then rename)."""
    name, hub_name, hub_config = cfg.name, cfg.hub_name, cfg.hub_config
    hub_split = getattr(cfg, f"{split}_split")
    target = _data_dir(data_dir) / name / f"{split}.jsonl"
    if not hub_name:
        raise DataError(f"dataset.hub_name is not set for {name}, and there is no {target}: give the hub "
                        f"data set, or put the file there (paths.data, or {DATA_DIR_ENV}, is the data folder)")
    if not hub_split:
        raise DataError(f"dataset={name}: {hub_name} has no {split} split (dataset.{split}_split is null) and "
                        f"there is no {target}; give your own file with dataset.{split}_path=FILE, or use "
                        "another data set for it")
    what = f"{hub_name} (config {hub_config or 'default'}, split {hub_split})"
    try:
        import datasets
    except ImportError:
        raise DataError(f"dataset={name}: loading {what} needs the 'datasets' package, which is not "
                        f"installed; install it, or put the file at {target}") from None
    # without a network huggingface_hub logs a warning per retry before it gives up (about 20 s); the
    # one line below says what went wrong
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        ds = datasets.load_dataset(hub_name, hub_config, split=hub_split, revision=cfg.hub_revision)
    except Exception as e:  # offline, unknown name, config or split: all user-facing
        raise DataError(f"dataset={name}: no {target}, and {what} could not be loaded ({_first_line(e)}); "
                        f"put the file there (paths.data=DIR or {DATA_DIR_ENV}=DIR is the data folder), "
                        f"or run once with a network (mgrpo data {name})") from None
    finally:
        hub_log.setLevel(level)
    rename = dict(cfg.hub_rename)
    if rename:
        try:
            ds = ds.rename_columns(dict(rename))
        except ValueError as e:
            raise DataError(f"dataset.hub_rename={rename}: {_first_line(e)}") from None
    _write_jsonl(ds, target)
    source = {"hub_name": hub_name, "hub_config": hub_config, "split": hub_split,
              "revision": _loaded_revision(hub_name, cfg.hub_revision), "rows": len(ds)}
    target.with_name(f"{split}{SOURCE_SUFFIX}").write_text(json.dumps(source, indent=1) + "\n")
    log.info("wrote %d rows of %s to %s", len(ds), what, target)
    return target


SOURCE_SUFFIX = ".source.json"  # <split>.source.json: where a split written from the Hub came from


def _loaded_revision(hub_name: str, requested: Optional[str]) -> Optional[str]:
    """The commit of the Hub set that was read (the Hub resolves ``requested``, a branch or tag, to one);
    None for a local folder. When the Hub cannot be asked, the requested revision as given."""
    if Path(hub_name).expanduser().exists():
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(hub_name, revision=requested).sha or requested
    except Exception:  # offline after a cached load, or a Hub error: what was asked for
        return requested


def split_source(data_dir: Optional[str | Path], name: str, split: str) -> Optional[dict[str, Any]]:
    """The sidecar of ``<data_dir>/<name>/<split>.jsonl``: the Hub set, config, split and revision it was
    written from (None when the file was put there by hand)."""
    path = _data_dir(data_dir) / name / f"{split}{SOURCE_SUFFIX}"
    return json.loads(path.read_text()) if path.is_file() else None


def _write_jsonl(rows: Any, target: Path) -> None:
    """Rows as JSON Lines at ``target``, atomically: readers see the whole file or none."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, target)
    except OSError as e:
        if tmp.is_file():
            tmp.unlink()
        raise DataError(f"paths.data={target.parent.parent}: cannot write {target} ({e.strerror or e}); "
                        f"give a writable data folder (paths.data=DIR or {DATA_DIR_ENV}=DIR)") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _resolve_path(value: str, key: str) -> Path:
    path = Path(str(value)).expanduser()
    if path.is_file():
        return path.resolve()
    raise DataError(f"dataset.{key}: file not found: {str(value)!r} (looked at {path.absolute()})")


def _read_file(path: Path) -> Iterator[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise DataError(f"{path}: unknown file type {suffix!r}; expected .jsonl, .json (JSON Lines) or .parquet")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line number, text) per line, read as bytes so that a line that is not UTF-8 (a binary file, a
    Latin-1 export) comes back with the reason as its third item (empty for a good line) rather than
    as a ``UnicodeDecodeError`` from the middle of the file."""
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8"), ""
            except UnicodeDecodeError as e:
                yield line_no, "", (f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                    "JSON Lines files are UTF-8")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or _BadRow) per non-blank line."""
    for line_no, text, bad in _utf8_lines(path):
        if bad:
            yield line_no, _BadRow(bad)
            continue
        if not text.strip():
            continue
        try:
            yield line_no, json.loads(text.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            yield line_no, _BadRow(f"bad JSON ({e.msg} at column {e.colno})")


def json_lines(path: Path, error: type[Exception]) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file of objects; a line that is not
    UTF-8 or not a JSON object raises ``error`` naming ``file:line``."""
    for line_no, text, bad in _utf8_lines(path):
        if bad:
            raise error(f"{path}:{line_no}: {bad}")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{line_no}: bad JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise error(f"{path}:{line_no}: not a JSON object")
        yield line_no, obj


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read Parquet: {e}") from None
    return enumerate(table.to_pylist(), start=1)


# ------------------------------------------------------------------------------------------ rows


@dataclass(frozen=True)
class _Fields:
    question: str
    answer: Optional[str]
    solution: Optional[str]
    subject: Optional[str]
    level: Optional[str]
    id: Optional[str]


def _field_map(cfg: DatasetSpec, answer_format: str) -> _Fields:
    raw = dict(cfg.fields)
    fields = _Fields(**{f.name: raw.get(f.name) for f in dataclasses.fields(_Fields)})
    if not fields.question:
        raise DataError(f"dataset.fields.question must name a field, got {fields.question!r}")
    if answer_format in ("answer", "gsm8k", "list") and not fields.answer:
        raise DataError(f"dataset.fields.answer must name a field for answer_format={answer_format}, "
                        f"got {fields.answer!r}")
    if answer_format == "boxed" and not (fields.answer or fields.solution):
        raise DataError("dataset.fields.answer or dataset.fields.solution must name a field for "
                        "answer_format=boxed")
    return fields


def _problem(row: Any, fields: _Fields, answer_format: str, default_id: str) -> Problem:
    if isinstance(row, _BadRow):
        raise row
    if not isinstance(row, dict):
        raise _BadRow(f"not a JSON object (got {type(row).__name__})")
    try:
        question = _text(row, fields.question, required=True)
        solution = _text(row, fields.solution) if fields.solution else None
        answer = _gold(row, fields, answer_format, solution)
    except _Missing as e:  # name the mapping, which is what a user fixes when the data set is not at fault
        keys = ", ".join(f"dataset.fields.{f.name}={e.key}" for f in dataclasses.fields(_Fields)
                         if getattr(fields, f.name) == e.key)
        has = "" if e.key in row else f"; the row's fields: {', '.join(map(str, row)) or 'none'}"
        raise _BadRow(f"{e} ({keys}{has})") from None

    meta: dict[str, Any] = {}
    if fields.subject and row.get(fields.subject) is not None:
        meta["subject"] = str(row[fields.subject])
    if fields.level and row.get(fields.level) is not None:
        meta["level"] = _level(row[fields.level])
    raw_id = row.get(fields.id) if fields.id else None
    if raw_id is not None:
        meta["id"] = raw_id
    mapped = {getattr(fields, f.name) for f in dataclasses.fields(_Fields)}
    extra = {k: v for k, v in row.items() if k not in mapped}
    return Problem(id=default_id if raw_id is None else str(raw_id), question=question,
                   answer=answer, solution=solution, meta=meta, extra=extra)


def _text(row: dict, key: str, *, required: bool = False) -> Optional[str]:
    """The field as text (a list of strings, as OlympiadBench's solution, joined by blank lines)."""
    value = row.get(key)
    if value is None:
        if required:
            raise _Missing(key)
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        value = "\n\n".join(value)
    if not isinstance(value, str):
        raise _BadRow(f"field {key!r} is not text (got {type(value).__name__})")
    text = value
    if required and not text.strip():
        raise _BadRow(f"blank field {key!r}")
    return text


def _gold(row: dict, fields: _Fields, answer_format: str, solution: Optional[str]) -> str:
    if answer_format == "answer":
        gold = _scalar(row, fields.answer)
    elif answer_format == "gsm8k":
        gold = _gsm8k_gold(row, fields.answer)
    elif answer_format == "boxed":
        gold = _boxed_gold(row, fields, solution)
    else:
        gold = _list_gold(row, fields.answer)
    if not gold.strip():
        raise _BadRow(f"blank gold answer in field {fields.answer or fields.solution!r}")
    return gold.strip()


def _scalar(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise _Missing(key)
    if isinstance(value, (dict, list, tuple)):
        raise _BadRow(f"field {key!r} is a {type(value).__name__}, expected a string")
    if not str(value).strip():
        raise _BadRow(f"blank field {key!r}")
    return str(value)


def _gsm8k_gold(row: dict, key: str) -> str:
    from mgrpo_cli.grading.extract import extract_gold_gsm8k

    try:
        return extract_gold_gsm8k(_scalar(row, key))
    except ValueError:  # no "####", or nothing after it
        raise _BadRow(f"field {key!r} has no '#### <answer>' line") from None


def _boxed_gold(row: dict, fields: _Fields, solution: Optional[str]) -> str:
    from mgrpo_cli.grading.extract import last_boxed

    if fields.answer:
        value = row.get(fields.answer)
        if value is not None and not isinstance(value, (dict, list, tuple)) and str(value).strip():
            return str(value)
        if not fields.solution:
            return _scalar(row, fields.answer)  # raises: missing, blank or not a string
    if solution is None:
        where = f"field {fields.answer!r} or " if fields.answer else ""
        raise _BadRow(f"missing gold: no {where}field {fields.solution!r}")
    boxed = last_boxed(solution)
    if boxed is None or not boxed.strip():
        raise _BadRow(f"missing gold: no \\boxed{{}} answer in field {fields.solution!r}")
    return boxed


def _list_gold(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        raise _Missing(key)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise _BadRow(f"blank field {key!r}")
        if text.startswith(("[", "(")):
            if len(text) > LIST_MAX_CHARS:
                raise _BadRow(f"field {key!r} is {len(text)} characters, over {LIST_MAX_CHARS}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise _BadRow(f"field {key!r} is not a list literal: {text[:80]!r}") from None
        else:
            value = [text]  # a bare answer string: one answer
    if not isinstance(value, (list, tuple)):
        value = [value]
    # OlympiadBench packs several answers into one element as "$69$,$84$": split them there
    pieces = [p for v in value if v is not None for p in _DOLLAR_COMMA.split(str(v))]
    answers = [_UNESCAPED_DOLLAR.sub("", p).strip() for p in pieces]
    answers = [a for a in answers if a]
    if not answers:
        raise _BadRow(f"field {key!r} holds no answer: {value!r}")
    return ", ".join(answers)


def _level(value: Any) -> Any:
    """``3`` and ``"Level 3"`` -> 3; anything else (``"Level ?"``) is kept as is."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value
    match = _LEVEL_NUMBER.fullmatch(str(value).strip())
    return int(match.group(1)) if match else value


# --------------------------------------------------------------------------------------- helpers


def _take(problems: list[Problem], limit: Optional[int], seed: Optional[int]) -> list[Problem]:
    if limit is None or limit >= len(problems):
        return problems
    if seed is None:
        return problems[:limit]
    keep = sorted(random.Random(seed).sample(range(len(problems)), limit))
    return [problems[i] for i in keep]
