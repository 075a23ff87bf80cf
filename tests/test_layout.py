"""The package's layout: every module imports, no module imports itself back through others, and the
subpackages depend one way, in the order the README's code map gives them."""
import ast
import graphlib
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import mgrpo_cli

PACKAGE = Path(mgrpo_cli.__file__).parent
# a subpackage imports only those to its right; errors (the package base: UserError and the one-line
# path) and config.schema (the schema's constants) may be imported by every subpackage; cli holds the
# commands and the build step, the only reader of the whole config
ORDER = ["cli", "config", "training", "algo", "rollout", "models", "reporting", "data", "grading"]
BASE = {"mgrpo_cli.errors", "mgrpo_cli.config.schema"}
# one-release aliases of moved modules: they import where the names went
ALIASES = {"mgrpo_cli.data.models"}


def _modules() -> dict[str, Path]:
    return {"mgrpo_cli." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``path`` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mgrpo_cli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_imports():
    for info in pkgutil.walk_packages(mgrpo_cli.__path__, "mgrpo_cli."):
        if info.name not in ALIASES:  # test_aliases_reexport_the_moved_names imports those
            importlib.import_module(info.name)


def test_aliases_reexport_the_moved_names():
    from mgrpo_cli.models import loading, tiny

    sys.modules.pop("mgrpo_cli.data.models", None)
    with pytest.deprecated_call():
        old = importlib.import_module("mgrpo_cli.data.models")
    for name in ("load_policy", "ModelSpec", "LoraSpec", "apply_lora", "export", "reference_policy"):
        assert getattr(old, name) is getattr(loading, name)
    for name in ("build_byte_tokenizer", "build_tiny_model"):
        assert getattr(old, name) is getattr(tiny, name)


def test_no_module_imports_itself_back():
    graph = {name: {d for d in deps if not name.startswith(d + ".")} for name, deps in _graph().items()}
    list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError naming the cycle


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return None if module in BASE | ALIASES or len(parts) < 3 else parts[1]


def test_subpackages_depend_one_way():
    assert sorted(ORDER) == sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    upward = []
    for module, deps in _graph().items():
        src = _subpackage(module)
        for dep in deps:
            dst = _subpackage(dep)
            if src and dst and src != dst and ORDER.index(dst) < ORDER.index(src):
                upward.append(f"{module} -> {dep}")
    assert upward == []
