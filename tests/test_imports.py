"""The layers hold, as the imports prove: `cpo_data` (the library) <- `training` <- `pipelines`.

The graph is read from the source with `ast`, so an import inside a function counts as much as
one at the top of a module (a text search would miss `__import__` and `importlib` calls, and
importing the modules would only see what runs at import time).
"""

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["cpo_data", "pipelines", "training"]
PREFECT = {"prefect", "prefect_dask"}
FORBIDDEN = {
    "cpo_data": PREFECT | {"pipelines", "training"},
    "training": PREFECT | {"pipelines"},
}


def _modules():
    for package in PACKAGES:
        yield package
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            yield info.name


@pytest.mark.parametrize("name", sorted(set(_modules())))
def test_every_module_imports(name):
    assert importlib.import_module(name).__name__ == name


def imported_names(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, top-level module) of every import in a file: statements anywhere in it, relative
    ones resolved within `package`, and `importlib.import_module` / `__import__` calls on a
    literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, package if node.level else node.module or ""))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(
                function, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return [(line, name.split(".")[0]) for line, name in found]


def layer_violations(root: Path) -> list[str]:
    """`file:line imports X` for every import that crosses a layer the wrong way."""
    violations = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imported_names(path, package):
                if name in forbidden:
                    violations.append(f"{path.relative_to(root)}:{line} imports {name}")
    return violations


def test_the_library_and_training_import_only_downwards():
    assert layer_violations(ROOT) == []


def test_the_guard_sees_imports_inside_functions(tmp_path):
    """The mistake the guard exists for, planted in a copy of the layout."""
    for package in FORBIDDEN:
        (tmp_path / package).mkdir()
    (tmp_path / "cpo_data" / "ok.py").write_text("import pyarrow\nfrom . import store\n")
    (tmp_path / "cpo_data" / "stage.py").write_text(
        "def run():\n    import prefect.flows\n    return prefect\n")
    (tmp_path / "cpo_data" / "hidden.py").write_text(
        "import importlib\n\ndef f():\n    return importlib.import_module('pipelines.build')\n")
    (tmp_path / "training" / "loop.py").write_text(
        "import cpo_data\n\ndef g():\n    from pipelines.cli import main\n")
    assert layer_violations(tmp_path) == [
        "cpo_data/hidden.py:4 imports pipelines",
        "cpo_data/stage.py:2 imports prefect",
        "training/loop.py:4 imports pipelines",
    ]


HEAVY = ("torch", "transformers", "prefect", "comet")


@pytest.mark.parametrize("command", [["--help"], ["versions", "{store}"],
                                     ["inspect", "{store}", "--rows", "1"]])
def test_quick_commands_load_no_model_library(command, tmp_path):
    """`cpo-data --help`, `versions` and `inspect` answer without torch, transformers, COMET
    or Prefect (seconds of imports each)."""
    from cpo_data import store
    from cpo_data.testing import sample_triplets

    store.publish_triplets(sample_triplets(rows_per_pair=2), str(tmp_path / "store"), "mt",
                           provenance={"source_fingerprint": "f1" * 32})
    argv = [part.format(store=tmp_path / "store" / "mt") for part in command]
    script = (f"import sys, json\nfrom pipelines.cli import main\ntry:\n    main({argv!r})\n"
              "except SystemExit:\n    pass\n"
              f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
