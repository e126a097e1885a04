import importlib
import pkgutil

import pytest

PACKAGES = ["cpo_data", "pipelines", "training"]


def _modules():
    for package in PACKAGES:
        yield package
        module = importlib.import_module(package)
        for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}."):
            yield info.name


@pytest.mark.parametrize("name", sorted(set(_modules())))
def test_every_module_imports(name):
    assert importlib.import_module(name).__name__ == name


def test_library_never_imports_prefect():
    """DESIGN: no Prefect import anywhere in cpo_data; flows live in pipelines/."""
    import pathlib

    root = pathlib.Path(importlib.import_module("cpo_data").__file__).parent
    offenders = [str(p) for p in root.rglob("*.py")
                 if "import prefect" in p.read_text() or "from prefect" in p.read_text()]
    assert offenders == []
