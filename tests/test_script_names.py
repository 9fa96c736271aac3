"""No script folder may hold a module named like something importable from the environment.

``python benchmarks/bench_train.py`` puts ``benchmarks/`` first on ``sys.path``: a file there named
``kernels.py`` shadowed the PyPI package ``kernels`` that transformers imports, and every run failed
(the fresh-install failure of issue 20). The same holds for ``recipes/``. This test fails on the next
such name, whatever package brings it.
"""

import importlib.metadata
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = ("benchmarks", "recipes")


def _module_names(folder: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / folder).glob("*.py"))


def _found_elsewhere(name: str, folder: Path) -> str | None:
    """Where ``name`` imports from when ``folder`` is not on sys.path (None if nowhere)."""
    if name in sys.stdlib_module_names:
        return "the standard library"
    distributions = importlib.metadata.packages_distributions().get(name)
    if distributions:
        return f"the installed distribution(s) {', '.join(sorted(set(distributions)))}"
    path = [p for p in sys.path if Path(p or ".").resolve() != folder.resolve()]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is not None and spec.origin and not Path(spec.origin).is_relative_to(ROOT):
        return spec.origin
    return None


@pytest.mark.parametrize("folder", SCRIPT_FOLDERS)
def test_script_modules_shadow_nothing_installed(folder):
    clashes = {name: where for name in _module_names(folder)
               if (where := _found_elsewhere(name, ROOT / folder)) is not None}
    assert not clashes, (
        f"{folder}/ holds modules that shadow importable ones when a script there runs: {clashes}; "
        "rename them (benchmarks use the bench_ prefix)")


def test_the_guard_catches_a_clash(tmp_path):
    (tmp_path / "json.py").write_text("")
    assert _found_elsewhere("json", tmp_path) == "the standard library"
    assert _found_elsewhere("dp_accounting", tmp_path) is not None
    assert _found_elsewhere("bench_train", tmp_path) is None
