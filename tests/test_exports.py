"""Every module's ``__all__`` names only what exists: ``from module import *`` works everywhere."""

import importlib
import os
import pathlib
import pkgutil
import subprocess
import sys

import pytest

import dpfused


def _modules():
    return sorted(m.name for m in pkgutil.walk_packages(dpfused.__path__, "dpfused."))


@pytest.mark.parametrize("name", _modules())
def test_star_import_works(name):
    module = importlib.import_module(name)
    missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"
    exec(f"from {name} import *", {})


def test_import_dpfused_leaves_the_opacus_wing_out():
    """The top level is the native API: importing it loads no module of ``dpfused.opacus`` (a fresh
    interpreter, so no other test's import counts), and it exports none of the wing's names but
    ``PrivacyEngine``, the one-import switch (the wing's is Opacus' personality of the native
    one)."""
    code = ("import sys, dpfused; "
            "print([m for m in sys.modules if m.split('.')[:2] == ['dpfused', 'opacus']])")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=root, env=env, check=True)
    assert result.stdout.strip() == "[]"
    import dpfused.opacus

    assert set(dpfused.__all__) & set(dpfused.opacus.__all__) == {"PrivacyEngine"}
