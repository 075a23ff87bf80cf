"""Tests for ``mgrpo_cli.data.loaders``: malformed rows, skip mode, formats, the data folder, the Hub path
(through a local folder, as ``datasets.load_dataset`` reads one), and the four real data sets."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from conftest import DATA, compose
from omegaconf import OmegaConf

from mgrpo_cli.cli import build
from mgrpo_cli.config.schema import ArithConfig, DatasetConfig, FieldMap
from mgrpo_cli.data import loaders
from mgrpo_cli.data.loaders import DataError, Loaded, split_source


def load(dataset, split: str, **kw) -> Loaded:
    """``loaders.load_problems`` of a ``DatasetConfig`` (or its node), made plain as the build layer does."""
    return loaders.load_problems(build.dataset_spec(dataset), split, **kw)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def file_cfg(path: Path, **overrides) -> DatasetConfig:
    return DatasetConfig(**{"name": "toy", "kind": "file", "test_path": str(path), **overrides})


GOOD = json.dumps({"question": "1+1?", "answer": "2"})


# ---------------------------------------------------------------------------- malformed rows

MALFORMED = [
    ("{\"question\": ", "bad JSON (Expecting value at column 14)"),
    ("[1, 2]", "not a JSON object (got list)"),
    ("\"text\"", "not a JSON object (got str)"),
    (json.dumps({"answer": "2"}), "missing field 'question' (dataset.fields.question=question; the row's fields: answer)"),
    (json.dumps({"question": None, "answer": "2"}), "missing field 'question' (dataset.fields.question=question)"),
    (json.dumps({"question": "   ", "answer": "2"}), "blank field 'question'"),
    (json.dumps({"question": "q"}), "missing field 'answer' (dataset.fields.answer=answer; the row's fields: question)"),
    (json.dumps({"question": "q", "answer": " "}), "blank field 'answer'"),
    (json.dumps({"question": "q", "answer": ["2"]}), "field 'answer' is a list, expected a string"),
]


@pytest.mark.parametrize("bad,reason", MALFORMED)
def test_malformed_row_error_names_file_and_line(tmp_path, bad, reason):
    path = write_jsonl(tmp_path / "test.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError) as info:
        load(file_cfg(path), "test")
    assert str(info.value) == f"{path}:3: {reason}"


def test_malformed_row_is_a_value_error(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", ["nope"])
    with pytest.raises(ValueError, match=r"test\.jsonl:1: bad JSON"):
        load(file_cfg(path), "test")


@pytest.mark.parametrize("fmt,row,reason", [
    ("gsm8k", {"question": "q", "answer": "it is 4"}, "field 'answer' has no '#### <answer>' line"),
    ("gsm8k", {"question": "q", "answer": "it is 4\n####  "}, "field 'answer' has no '#### <answer>' line"),
    ("boxed", {"problem": "q", "solution": "it is 4"},
     "missing gold: no \\boxed{} answer in field 'solution'"),
    ("boxed", {"problem": "q"}, "missing gold: no field 'solution'"),
    ("list", {"problem": "q", "final_answer": "['2'"}, "field 'final_answer' is not a list literal: \"['2'\""),
    ("list", {"problem": "q", "final_answer": "[]"}, "field 'final_answer' holds no answer: []"),
    ("list", {"problem": "q"}, "missing field 'final_answer' (dataset.fields.answer=final_answer; the row's fields: problem)"),
])
def test_malformed_gold_per_format(tmp_path, fmt, row, reason):
    fields = {
        "gsm8k": FieldMap(question="question", answer="answer"),
        "boxed": FieldMap(question="problem", answer=None, solution="solution"),
        "list": FieldMap(question="problem", answer="final_answer"),
    }[fmt]
    first = {"question": "q", "answer": "#### 1", "problem": "q", "solution": "\\boxed{1}",
             "final_answer": ["1"]}
    path = write_jsonl(tmp_path / "test.jsonl", [json.dumps(first), json.dumps(row)])
    with pytest.raises(DataError) as info:
        load(file_cfg(path, fields=fields, answer_format=fmt), "test")
    assert str(info.value) == f"{path}:2: {reason}"


def test_skip_mode_counts_and_logs_each_row(tmp_path, caplog):
    lines = [GOOD, "{oops", json.dumps({"answer": "3"}), GOOD, "[]", json.dumps({"question": "q", "answer": ""})]
    path = write_jsonl(tmp_path / "test.jsonl", lines)
    with caplog.at_level(logging.WARNING, logger="mgrpo_cli.data.loaders"):
        loaded = load(file_cfg(path, on_bad_row="skip"), "test")
    assert isinstance(loaded, Loaded)
    assert loaded.skipped == 4
    assert [p.id for p in loaded.problems] == ["toy-test-1", "toy-test-4"]
    assert loaded.source == str(path)
    text = caplog.text
    for line, reason in [(2, "bad JSON"), (3, "missing field 'question'"), (5, "not a JSON object"),
                         (6, "blank field 'answer'")]:
        assert f"{path}:{line}: {reason}" in text
    assert "skipped 4 of 6 rows" in text


def test_blank_lines_are_ignored_but_keep_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [GOOD, "", "  ", "{bad"])
    with pytest.raises(DataError, match=r"test\.jsonl:4: bad JSON"):
        load(file_cfg(path), "test")


def test_empty_file(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [])
    with pytest.raises(DataError, match=r"test\.jsonl: no rows"):
        load(file_cfg(path), "test")


def test_all_rows_skipped(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", ["{", "["])
    with pytest.raises(DataError, match="no usable rows, all 2 skipped"):
        load(file_cfg(path, on_bad_row="skip"), "test")


# -------------------------------------------------------------------------- config and paths


def test_missing_file_names_key_and_path(tmp_path):
    cfg = file_cfg(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"dataset\.test_path: file not found: '.*nope\.jsonl'"):
        load(cfg, "test")


def test_unset_split_path_and_no_data_folder_file(tmp_path):
    cfg = DatasetConfig(name="math500", kind="file", test_path="x.jsonl")
    want = rf"^dataset\.train_path is not set for math500, and there is no {tmp_path}/math500/train\.jsonl "
    with pytest.raises(DataError, match=want):
        load(cfg, "train", data_dir=tmp_path)


def test_relative_path_from_the_current_folder(tmp_path, monkeypatch):
    (tmp_path / "sets").mkdir()
    write_jsonl(tmp_path / "sets" / "t.jsonl", [GOOD])
    monkeypatch.chdir(tmp_path)
    assert len(load(file_cfg(Path("sets/t.jsonl")), "test").problems) == 1
    with pytest.raises(DataError, match=str(tmp_path / "other" / "t.jsonl")):
        load(file_cfg(Path("other/t.jsonl")), "test")


def test_bad_split_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [GOOD])
    with pytest.raises(DataError, match="got 'valid'"):
        load(file_cfg(path), "valid")
    with pytest.raises(DataError, match="limit must be >= 0, got -1"):
        load(file_cfg(path), "test", limit=-1)


def test_unknown_suffix(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("question,answer\n")
    with pytest.raises(DataError, match=r"unknown file type '\.csv'"):
        load(file_cfg(path), "test")


# ------------------------------------------------------------------------ data folder and Hub


def test_data_folder_file_is_read_and_own_path_wins(tmp_path):
    write_jsonl((tmp_path / "toy").mkdir() or tmp_path / "toy" / "test.jsonl", [GOOD, GOOD])
    for kind in ("file", "hub"):  # hub: the file is there, the Hub (no hub_name here) is not asked
        loaded = load(DatasetConfig(name="toy", kind=kind), "test", data_dir=tmp_path)
        assert (len(loaded.problems), loaded.source) == (2, str(tmp_path / "toy" / "test.jsonl"))
    own = write_jsonl(tmp_path / "own.jsonl", [GOOD])
    cfg = DatasetConfig(name="toy", kind="hub", hub_name="org/none", test_path=str(own))
    assert load(cfg, "test", data_dir=tmp_path).source == str(own)


def test_data_folder_from_the_environment(tmp_path, monkeypatch):
    write_jsonl((tmp_path / "toy").mkdir() or tmp_path / "toy" / "test.jsonl", [GOOD])
    monkeypatch.setenv("MGRPO_DATA_DIR", str(tmp_path))
    assert load(DatasetConfig(name="toy", kind="file"), "test").source == str(tmp_path / "toy" / "test.jsonl")


def hub_folder(root: Path, rows: list[dict], split: str = "test") -> Path:
    """A folder ``datasets.load_dataset`` reads as a data set with one split (a Parquet file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / f"{split}-00000-of-00001.parquet")
    return root


def test_hub_split_is_written_once_to_the_data_folder(tmp_path):
    rows = [{"q": f"{i}+1?", "a": str(i + 1), "tags": ["x", "y"]} for i in range(5)]
    hub = hub_folder(tmp_path / "hub", rows, split="train")
    data = tmp_path / "data"
    cfg = DatasetConfig(name="toy", kind="hub", hub_name=str(hub), test_split="train", hub_rename={"q": "question"},
                        fields=FieldMap(question="question", answer="a"))
    loaded = load(cfg, "test", data_dir=data)
    target = data / "toy" / "test.jsonl"
    assert loaded.source == str(target) and [p.answer for p in loaded.problems] == ["1", "2", "3", "4", "5"]
    assert loaded.problems[0].question == "0+1?" and loaded.problems[0].extra == {"tags": ["x", "y"]}
    assert [json.loads(line) for line in target.read_text().splitlines()] == [
        {"question": r["q"], "a": r["a"], "tags": r["tags"]} for r in rows]
    # no temporary file left; the sidecar says where the split came from (a local folder: no revision)
    assert sorted(p.name for p in (data / "toy").iterdir()) == ["test.jsonl", "test.source.json"]
    assert split_source(data, "toy", "test") == {"hub_name": str(hub), "hub_config": None, "split": "train",
                                                 "revision": None, "rows": 5}
    # later runs read the file: the Hub set may be gone
    cfg.hub_name = str(tmp_path / "gone")
    assert load(cfg, "test", data_dir=data).problems == loaded.problems


def test_hub_revision_goes_to_load_dataset(tmp_path, monkeypatch):
    """dataset.hub_revision is what load_dataset reads; the sidecar keeps the revision as given when the Hub
    cannot be asked for the commit it resolves to (here: offline)."""
    import datasets

    seen = {}
    real = datasets.load_dataset

    def spy(*args, **kw):
        seen.update(kw)
        return real(str(hub_folder(tmp_path / "hub", [{"question": "1+1?", "answer": "2"}])), split="test")
    monkeypatch.setattr(datasets, "load_dataset", spy)
    cfg = DatasetConfig(name="toy", kind="hub", hub_name="org/toy", hub_config="main", hub_revision="v1.0")
    assert [p.answer for p in load(cfg, "test", data_dir=tmp_path / "data").problems] == ["2"]
    assert seen["revision"] == "v1.0"
    assert split_source(tmp_path / "data", "toy", "test") == {"hub_name": "org/toy", "hub_config": "main",
                                                               "split": "test", "revision": "v1.0", "rows": 1}


def test_hub_offline_is_one_line_naming_both_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = DatasetConfig(name="gsm8k", kind="hub", hub_name="openai/gsm8k", hub_config="main")
    with pytest.raises(DataError) as e:
        load(cfg, "test", data_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"dataset=gsm8k: no {tmp_path}/gsm8k/test.jsonl, and openai/gsm8k "
                                              "(config main, split test) could not be loaded (")
    assert "paths.data=DIR or MGRPO_DATA_DIR=DIR" in msg and msg.endswith("(mgrpo data gsm8k)")
    assert not (tmp_path / "gsm8k").exists()


def test_hub_split_that_does_not_exist(tmp_path):
    cfg = DatasetConfig(name="m5", kind="hub", hub_name="org/m5", train_split=None)
    with pytest.raises(DataError, match=r"^dataset=m5: org/m5 has no train split \(dataset\.train_split is null\)"):
        load(cfg, "train", data_dir=tmp_path)


def test_hub_bad_rename_and_unwritable_data_folder(tmp_path):
    hub = hub_folder(tmp_path / "hub", [{"question": "1+1?", "answer": "2"}])
    cfg = DatasetConfig(name="toy", kind="hub", hub_name=str(hub), hub_rename={"nope": "question"})
    with pytest.raises(DataError, match=r"^dataset\.hub_rename=\{'nope': 'question'\}: "):
        load(cfg, "test", data_dir=tmp_path / "data")
    (tmp_path / "file").write_text("")  # a file where the data folder should be
    cfg.hub_rename = {}
    with pytest.raises(DataError, match=rf"^paths\.data={tmp_path}/file: cannot write .*give a writable data folder"):
        load(cfg, "test", data_dir=tmp_path / "file")


def test_hub_without_datasets_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    cfg = DatasetConfig(name="gsm8k", kind="hub", hub_name="openai/gsm8k", hub_config="main")
    with pytest.raises(DataError, match="needs the 'datasets' package, which is not installed"):
        load(cfg, "test", data_dir=tmp_path)


def test_hub_name_unset(tmp_path):
    with pytest.raises(DataError, match=f"^dataset.hub_name is not set for x, and there is no {tmp_path}/x/test.jsonl"):
        load(DatasetConfig(name="x", kind="hub"), "test", data_dir=tmp_path)


# ------------------------------------------------------------------------ mapping and formats


def test_field_mapping_meta_and_ids(tmp_path):
    rows = [
        {"problem": "p1", "ans": 7, "sol": "s", "topic": "Algebra", "lvl": "Level 3", "uid": "a/1"},
        {"problem": "p2", "ans": " x ", "lvl": 5},
        {"problem": "p3", "ans": "y", "lvl": "Level ?", "topic": None},
    ]
    path = write_jsonl(tmp_path / "test.jsonl", [json.dumps(r) for r in rows])
    fields = FieldMap(question="problem", answer="ans", solution="sol", subject="topic", level="lvl", id="uid")
    cfg = OmegaConf.structured(file_cfg(path, fields=fields))  # an OmegaConf node works as well
    p1, p2, p3 = load(cfg, "test").problems
    assert (p1.id, p1.question, p1.answer, p1.solution) == ("a/1", "p1", "7", "s")
    assert p1.meta == {"subject": "Algebra", "level": 3, "id": "a/1"}
    assert (p2.id, p2.answer, p2.solution, p2.meta) == ("toy-test-2", "x", None, {"level": 5})
    assert p3.meta == {"level": "Level ?"}
    assert (p1.extra, p2.extra) == ({}, {})


def test_unmapped_fields_are_kept_as_extra(tmp_path):
    """Own reward functions get a row's other fields (``Problem.extra``) as read."""
    rows = [{"problem": "p1", "ans": 7, "hint": "add", "tags": ["a", "b"], "weight": 0.5}]
    path = write_jsonl(tmp_path / "test.jsonl", [json.dumps(r) for r in rows])
    (p,) = load(file_cfg(path, fields=FieldMap(question="problem", answer="ans")), "test").problems
    assert p.extra == {"hint": "add", "tags": ["a", "b"], "weight": 0.5}


@pytest.mark.parametrize("value,gold", [
    ("['2']", "2"),
    ("['$x=3$', '$y=4$']", "x=3, y=4"),
    (["$\\frac{1}{2}$"], "\\frac{1}{2}"),
    (["$69$,$84$"], "69, 84"),
    ("$5$", "5"),
    ("('a', 'b')", "a, b"),
    ("['\\\\$5']", "\\$5"),
])
def test_list_gold(tmp_path, value, gold):
    path = write_jsonl(tmp_path / "test.jsonl", [json.dumps({"question": "q", "final_answer": value})])
    cfg = file_cfg(path, fields=FieldMap(answer="final_answer"), answer_format="list")
    assert load(cfg, "test").problems[0].answer == gold


def test_list_gold_length_cap(tmp_path):
    value = "['" + "9" * 5000 + "']"
    path = write_jsonl(tmp_path / "test.jsonl", [json.dumps({"question": "q", "final_answer": value})])
    cfg = file_cfg(path, fields=FieldMap(answer="final_answer"), answer_format="list")
    with pytest.raises(DataError, match="is 5004 characters, over 4000"):
        load(cfg, "test")


def test_boxed_prefers_answer_field(tmp_path):
    rows = [{"problem": "q", "answer": "5", "solution": "\\boxed{6}"},
            {"problem": "q", "solution": "so \\boxed{\\frac{1}{2}} and \\boxed{x^{2}}"}]
    path = write_jsonl(tmp_path / "test.jsonl", [json.dumps(r) for r in rows])
    cfg = file_cfg(path, fields=FieldMap(question="problem", answer="answer", solution="solution"),
                   answer_format="boxed")
    assert [p.answer for p in load(cfg, "test").problems] == ["5", "x^{2}"]


def test_gsm8k_gold_strips_commas(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [json.dumps({"question": "q", "answer": "5*2=10\n#### 1,250"})])
    cfg = file_cfg(path, answer_format="gsm8k")
    assert load(cfg, "test").problems[0].answer == "1250"


def test_limit_and_seeded_sample(tmp_path):
    lines = [json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(20)]
    path = write_jsonl(tmp_path / "test.jsonl", lines)
    cfg = file_cfg(path)
    assert [p.answer for p in load(cfg, "test", limit=3).problems] == ["0", "1", "2"]
    a = [p.answer for p in load(cfg, "test", limit=5, seed=1).problems]
    b = [p.answer for p in load(cfg, "test", limit=5, seed=1).problems]
    c = [p.answer for p in load(cfg, "test", limit=5, seed=2).problems]
    assert a == b and a != c and len(a) == 5
    assert a == sorted(a, key=int)  # the sample keeps file order
    assert len(load(cfg, "test", limit=50).problems) == 20


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"problem": "p1", "final_answer": ["$3$"], "level": "Level 2", "idx": 10},
            {"problem": "p2", "final_answer": ["a", "b"], "level": "Level 4", "idx": 11}]
    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = file_cfg(path, fields=FieldMap(question="problem", answer="final_answer", level="level", id="idx"),
                   answer_format="list")
    loaded = load(cfg, "test")
    assert [(p.id, p.question, p.answer, p.meta) for p in loaded.problems] == [
        ("10", "p1", "3", {"level": 2, "id": 10}),
        ("11", "p2", "a, b", {"level": 4, "id": 11}),
    ]


def test_parquet_missing_question_names_row(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "test.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "answer": "1"}, {"question": None, "answer": "2"}]), path)
    with pytest.raises(DataError, match=r"test\.parquet:2: missing field 'question' \(dataset\.fields\.question=question\)$"):
        load(file_cfg(path), "test")


# ------------------------------------------------------------------------------------- arith


def test_arith_splits():
    cfg = DatasetConfig(arith=ArithConfig(n_test=30, n_valid=10))
    test, valid = load(cfg, "test"), load(cfg, "valid")
    assert (len(test.problems), len(valid.problems), test.source) == (30, 10, "arith:test")
    assert not {p.question for p in test.problems} & {p.question for p in valid.problems}
    train = load(cfg, "train", limit=50)
    assert len(train.problems) == 50 and train.skipped == 0
    held_out = {p.question for p in test.problems + valid.problems}
    assert not held_out & {p.question for p in train.problems}
    # a seed moves the training stream, never the held-out sets
    assert load(cfg, "train", limit=5, seed=3).problems != train.problems[:5]
    assert load(OmegaConf.structured(cfg), "test").problems == test.problems


def test_arith_bad_split():
    with pytest.raises(DataError, match="got 'dev'"):
        load(DatasetConfig(), "dev")


# --------------------------------------------------------------------------- real data sets


def compose_dataset(name: str):
    """conf/dataset/<name>.yaml over the schema's defaults."""
    return compose("train", [f"dataset={name}"]).dataset


@pytest.mark.parametrize("name,hub", [
    ("gsm8k", ("openai/gsm8k", "main", "train", "test")),
    ("math500", ("HuggingFaceH4/MATH-500", None, None, "test")),
    ("math", ("DigitalLearningGmbH/MATH-lighteval", None, "train", "test")),
    ("minerva", ("math-ai/minervamath", None, None, "test")),
    ("olympiadbench", ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", None, "train")),
])
def test_dataset_configs_name_their_hub_sets(name, hub):
    cfg = compose_dataset(name)
    assert cfg.name == name and cfg.kind == "hub" and not (cfg.train_path or cfg.test_path)
    assert (cfg.hub_name, cfg.hub_config, cfg.train_split, cfg.test_split) == hub
    # pinned where public evaluation code pins the same commit; the data folder's sidecar records the rest
    pinned = {"gsm8k": "740312add88f781978c0658806c59bc2815b9866", "math500": "6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be"}
    assert cfg.hub_revision == pinned.get(name)


def test_math_from_the_hub_offline_is_one_line(tmp_path):
    with pytest.raises(DataError, match=r"^dataset=math: no .*, and DigitalLearningGmbH/MATH-lighteval \(config "
                                        r"default, split train\) could not be loaded"):
        load(compose_dataset("math"), "train", data_dir=tmp_path)


needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")


@needs_data
@pytest.mark.parametrize("name,n,first", [
    ("gsm8k", 1319, dict(answer="18", id="gsm8k-test-1", meta={})),
    ("math500", 500, dict(answer="\\left( 3, \\frac{\\pi}{2} \\right)", id="test/precalculus/807.json",
                          meta={"subject": "Precalculus", "level": 2, "id": "test/precalculus/807.json"})),
    ("minerva", 272, dict(answer="1.6", id="0",
                          meta={"subject": "Introduction to Astronomy (8.282J Spring 2006)", "id": 0})),
    # the data folder holds Qwen2.5-Math's evaluation file of OlympiadBench (675 rows; the Hub's split has 674)
    ("olympiadbench", 675, dict(answer="2", id="1606", meta={"subject": "Combinatorics", "id": 1606})),
])
def test_real_test_sets(name, n, first, tmp_path, monkeypatch):
    if name == "minerva" and not (DATA / "minerva").is_dir():
        # the shared folder holds the set as minerva_math/, and its minerva alias is not a folder on every
        # checkout: a data folder whose minerva/ is that folder
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "minerva").symlink_to(DATA / "minerva_math")
        monkeypatch.setenv("MGRPO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # the data folder is MGRPO_DATA_DIR, whatever the current folder
    loaded = load(compose_dataset(name), "test")
    assert (len(loaded.problems), loaded.skipped) == (n, 0)
    p = loaded.problems[0]
    assert (p.answer, p.id, p.meta) == (first["answer"], first["id"], first["meta"])
    assert p.question.strip() and p.solution
    assert len({q.id for q in loaded.problems}) == n
    assert all(q.answer.strip() for q in loaded.problems)


@needs_data
def test_real_gsm8k_train_and_details():
    gsm = load(compose_dataset("gsm8k"), "train")
    assert len(gsm.problems) == 7473
    assert all(p.answer.lstrip("-").isdigit() for p in gsm.problems)  # commas stripped, integers
    assert "####" in gsm.problems[0].solution
    with pytest.raises(DataError, match="^dataset=minerva: math-ai/minervamath has no train split"):
        load(compose_dataset("minerva"), "train")


@needs_data
def test_real_olympiadbench_multiple_answers():
    ob = {p.id: p for p in load(compose_dataset("olympiadbench"), "test").problems}
    assert ob["1664"].answer == "69, 84"  # stored as ['$69$,$84$']
    assert ob["1606"].solution.startswith("Sergey can determine")
    assert not any("$" in p.answer for p in ob.values())


@needs_data
def test_real_math500_levels():
    levels = {p.meta["level"] for p in load(compose_dataset("math500"), "test").problems}
    assert levels == {1, 2, 3, 4, 5}


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "1"}\n{"question": "\xff", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: not UTF-8 text \(byte 0xff at column 15\)"):
        load(file_cfg(path), "test")


def test_a_field_mapping_that_matches_no_field_names_the_mapping(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"problem": "q", "answer": "1"}\n')
    cfg = file_cfg(path, fields=FieldMap(question="question_text"))
    with pytest.raises(DataError, match=r"rows\.jsonl:1: missing field 'question_text' "
                                        r"\(dataset\.fields\.question=question_text; the row's fields: problem, answer\)$"):
        load(cfg, "test")


def test_mgrpo_data_shows_where_a_cached_split_came_from(tmp_path, capsys):
    """`mgrpo data gsm8k` fills the data folder from a Hub set (here a local folder) and prints each split's
    source; listing the data folder later shows it again."""
    from mgrpo_cli.cli.data import main

    rows = [{"question": "1+1?", "answer": "#### 2"}]
    hub = hub_folder(tmp_path / "hub", rows, split="train")
    hub_folder(hub, rows, split="test")
    args = [f"dataset.hub_name={hub}", "dataset.hub_config=null", f"paths.data={tmp_path / 'data'}"]
    main(["gsm8k", *args])
    out = capsys.readouterr().out
    assert f"gsm8k test: 1 problems in {tmp_path / 'data' / 'gsm8k' / 'test.jsonl'} (from {hub}); source {hub} split " \
           "test revision none (a local folder)" in out
    main(args)
    assert f"test: {tmp_path / 'data' / 'gsm8k' / 'test.jsonl'}; source {hub} split test" in capsys.readouterr().out
