"""Bad input through the real CLI: one line that names it, a non-zero exit, no traceback.

Every case runs `mgrpo train|eval|data <overrides>` in a subprocess (all cases at once, a few in
parallel, in a module-scoped fixture); each parametrized test then checks its own result.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_cli

FAST = ["debug=fast", "logger=none", "trainer.threads=1"]


def _files(root: Path) -> dict[str, Path]:
    """Bad files the cases point at."""
    root.mkdir(parents=True, exist_ok=True)
    rows = {
        "broken.jsonl": '{"question": "1+1", "answer": "#### 2"}\n{"question": "2+2", "answer": \n',
        "missing_field.jsonl": '{"question": "1+1", "answer": "#### 2"}\n{"answer": "#### 4"}\n',
        "null_question.jsonl": '{"question": "1+1", "answer": "#### 2"}\n{"question": null, "answer": "#### 4"}\n',
        "number_question.jsonl": '{"question": 7, "answer": "#### 7"}\n',
        "empty.jsonl": "",
        "not_a_checkpoint.ckpt": "hello",
        "a_file": "x",
    }
    for name, text in rows.items():
        (root / name).write_text(text)
    raw = {
        "binary.jsonl": bytes([0x1F, 0x8B, 8, 0]) + bytes(range(256)) * 4,  # a gzip header, then bytes
        "latin1.jsonl": '{"question": "1+1", "answer": "#### 2"}\n{"question": "café", "answer": "#### 4"}\n'.encode("latin-1"),
    }
    for name, data in raw.items():
        (root / name).write_bytes(data)
    (root / "no_config").mkdir(exist_ok=True)
    return {name: root / name for name in [*rows, *raw, "no_config"]}


def _data(path: Path) -> list[str]:
    return ["dataset=gsm8k", f"dataset.train_path={path}", f"dataset.test_path={path}"]


# (id, command, overrides given the files, text the error line must contain)
CASES = [
    ("G=1", "train", lambda f: ["grpo.num_generations=1"], "grpo.num_generations=1: GRPO needs at least 2"),
    ("H=1", "train", lambda f: ["layer.group_size=1"], "layer.group_size=1"),
    ("depth=0", "train", lambda f: ["layer.depth=0"], "layer.depth=0"),
    ("k=0", "train", lambda f: ["layer.k=0"], "layer.k=0"),
    ("temperature=0", "train", lambda f: ["grpo.temperature=0"], "grpo.temperature=0"),
    ("std_eps=-1", "train", lambda f: ["grpo.std_eps=-1"], "grpo.std_eps=-1"),
    ("lr=0", "train", lambda f: ["grpo.lr=0"], "grpo.lr=0"),
    ("lr<0", "train", lambda f: ["grpo.lr=-1e-4"], "grpo.lr=-0.0001"),
    ("epsilon<0", "train", lambda f: ["grpo.epsilon=-0.1"], "grpo.epsilon=-0.1"),
    ("beta<0", "train", lambda f: ["grpo.beta=-1"], "grpo.beta=-1"),
    ("top_p=0", "train", lambda f: ["grpo.top_p=0"], "grpo.top_p=0"),
    ("max_steps<1", "train", lambda f: ["trainer.max_steps=-5"], "trainer.max_steps=-5"),
    ("val_every=0", "train", lambda f: ["trainer.val_every=0"], "trainer.val_every=0"),
    ("prompts=0", "train", lambda f: ["grpo.prompts_per_step=0"], "grpo.prompts_per_step=0"),
    ("budget=0", "train", lambda f: ["model.max_completion_length=0"], "model.max_completion_length=0"),
    ("correction budget=0", "train", lambda f: ["model.max_correction_length=0"], "model.max_correction_length=0"),
    ("layer budget=0", "train", lambda f: ["layer.max_new_tokens=0"], "layer.max_new_tokens=0"),
    ("eval.n=0", "train", lambda f: ["eval.n=0"], "eval.n=0"),
    ("timeout=0", "train", lambda f: ["reward.timeout_s=0"], "reward.timeout_s=0"),
    ("unknown term", "train", lambda f: ["reward.terms=[{name:brevity,weight:1.0}]"], "reward.terms[0].name=brevity"),
    ("own term not importable", "train", lambda f: ["reward.terms=[{name:accuracy,weight:1.0},{name:'no_such_pkg.mod:f',weight:0.1}]"],
     "reward.terms[1].name=no_such_pkg.mod:f: cannot import 'no_such_pkg.mod'"),
    ("num_iterations=0", "train", lambda f: ["grpo.num_iterations=0"], "grpo.num_iterations=0"),
    ("delta in the clip range", "train", lambda f: ["grpo.delta=1.1"], "grpo.delta=1.1: the cap must lie above"),
    ("top_entropy_quantile=0", "train", lambda f: ["grpo.top_entropy_quantile=0"], "grpo.top_entropy_quantile=0"),
    ("max_sampling_rounds=0", "train", lambda f: ["grpo.max_sampling_rounds=0"], "grpo.max_sampling_rounds=0"),
    ("missing model folder", "train", lambda f: ["model.path=/no/such/model"], "model.path=/no/such/model: no such folder"),
    ("model path is a file", "train", lambda f: [f"model.path={f['a_file']}"], "is a file"),
    ("folder without config", "train", lambda f: [f"model.path={f['no_config']}"], "holds no config.json"),
    ("hub offline", "train", lambda f: ["model=qwen1.5b"], "model.path=Qwen/Qwen2.5-Math-1.5B: is not a local folder"),
    ("missing ckpt", "train", lambda f: ["ckpt_path=/no/such.ckpt"], "ckpt_path=/no/such.ckpt: no such file"),
    ("not a ckpt", "train", lambda f: [f"ckpt_path={f['not_a_checkpoint.ckpt']}"], "not a PyTorch checkpoint"),
    ("outputs is a file", "train", lambda f: [f"paths.outputs={f['a_file']}"], "paths.outputs="),
    ("broken JSONL", "train", lambda f: _data(f["broken.jsonl"]), "broken.jsonl:2: bad JSON"),
    ("missing field", "train", lambda f: _data(f["missing_field.jsonl"]), "missing_field.jsonl:2: missing field 'question'"),
    ("null question", "train", lambda f: _data(f["null_question.jsonl"]), "null_question.jsonl:2: missing field 'question'"),
    ("number question", "train", lambda f: _data(f["number_question.jsonl"]), "number_question.jsonl:1: field 'question' is not text"),
    ("empty file", "train", lambda f: _data(f["empty.jsonl"]), "empty.jsonl: no rows"),
    ("missing file", "train", lambda f: _data(Path("/no/such.jsonl")), "/no/such.jsonl"),
    ("binary file", "train", lambda f: _data(f["binary.jsonl"]), "binary.jsonl:1: not UTF-8 text (byte 0x8b at column 2)"),
    ("Latin-1 file", "train", lambda f: _data(f["latin1.jsonl"]), "latin1.jsonl:2: not UTF-8 text (byte 0xe9 at column 18)"),
    ("field mapping", "train", lambda f: [*_data(f["missing_field.jsonl"]), "dataset.fields.question=nosuch"],
     "missing_field.jsonl:1: missing field 'nosuch' (dataset.fields.question=nosuch; the row's fields: question, answer)"),
    # Hydra's composition errors, before any task runs
    ("unknown key", "train", lambda f: ["grpo.nonsense=1"], "grpo.nonsense=1: grpo has no key 'nonsense'; the closest is grpo."),
    ("unknown key, a typo", "train", lambda f: ["grpo.lrr=1"], "grpo.lrr=1: grpo has no key 'lrr'; the closest is grpo.lr "),
    ("wrong type", "train", lambda f: ["trainer.max_steps=abc"], "trainer.max_steps=abc: expected an integer"),
    ("seed=abc", "train", lambda f: ["seed=abc"], "seed=abc: expected an integer"),
    ("bad choice", "train", lambda f: ["layer.select=smaple"],
     "layer.select=smaple: expected one of all, wrong, sample (did you mean sample?)"),
    ("missing group option", "train", lambda f: ["model=nope"], "model=nope: no such model config; choose one of qwen0.5b,"),
    ("null for a number", "train", lambda f: ["grpo.lr=null"], "grpo.lr=null: grpo.lr cannot be null"),
    ("override syntax", "train", lambda f: ["grpo.lr=["], "grpo.lr=[: cannot parse it"),
    ("eval wrong type", "eval", lambda f: ["eval.n=abc"], "eval.n=abc: expected an integer"),
    # no data folder, and the Hub offline (the tests' environment): one line naming both ways out
    ("no data folder, hub offline", "eval", lambda f: ["dataset=gsm8k", "paths.data=/no/such/data"],
     "dataset=gsm8k: no /no/such/data/gsm8k/test.jsonl, and openai/gsm8k (config main, split test) could not be loaded"),
    ("no train split", "train", lambda f: ["dataset=math500", "paths.data=/no/such/data"],
     "dataset=math500: HuggingFaceH4/MATH-500 has no train split"),
    ("data: hub offline", "data", lambda f: ["gsm8k", "paths.data=/no/such/data"], "(mgrpo data gsm8k)"),
    ("data: unknown set", "data", lambda f: ["nope"], "dataset=nope: not a data set of conf/dataset; known: arith, "),
    ("eval n>1 greedy", "eval", lambda f: ["dataset=arith", "eval.n=4", "eval.temperature=0"], "eval.temperature=0.0"),
    ("eval missing checkpoint", "eval", lambda f: ["checkpoint=/no/such.ckpt"], "checkpoint=/no/such.ckpt: no such file"),
    ("eval missing rescore", "eval", lambda f: ["rescore=/no/such.jsonl"], "/no/such.jsonl"),
    ("eval bad rescore", "eval", lambda f: [f"rescore={f['broken.jsonl']}"], "broken.jsonl:1: missing field"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    files = _files(root / "files")

    def one(case):
        name, command, overrides, _ = case
        outputs = root / "outputs" / re.sub(r"\W+", "_", name)
        given = overrides(files)
        if not any(o.startswith("paths.outputs=") for o in given):
            given = [f"paths.outputs={outputs}", *given]
        return name, run_cli(command, *FAST, *given, timeout=600)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("name,command,overrides,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it(results, name, command, overrides, needle):
    res = results[name]
    out = res.stdout + res.stderr
    assert res.returncode == 2, f"exit {res.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], json.dumps(res.stderr.splitlines()[-5:], indent=1)


@pytest.mark.parametrize("override", ["grpo.num_generations=1", "trainer.max_steps=abc"])
def test_full_traceback_on_request(tmp_path, override):
    res = run_cli("train", *FAST, f"paths.outputs={tmp_path}", override, env={"HYDRA_FULL_ERROR": "1"})
    assert res.returncode != 0 and "Traceback" in res.stderr and override.split("=")[0] in res.stderr
