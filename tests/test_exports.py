"""Every module's ``__all__`` names only what exists: ``from module import *`` works everywhere."""

import importlib
import pkgutil

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
