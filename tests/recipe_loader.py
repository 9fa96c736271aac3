"""Import a recipe script as a module (recipes/ is a folder of scripts, not a package), or run
one under a multi-process launcher. A recipe imports recipes/common.py itself (it puts its own
folder on sys.path); `load_common` returns that same module."""

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipes_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_common():
    """recipes/common.py, the very module the recipes import as `common` (so a monkeypatch on it is
    seen by them)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    return importlib.import_module("common")


def launch_recipe(launcher: list[str], script: str, args: list[str]) -> str:
    """Run ``python -m <launcher...> recipes/<script> <args...>``; its stdout (fails the test with
    the output's tail if it fails). One thread per process: the CI machine has 2 cores."""
    env = {**os.environ, "PYTHONPATH": str(RECIPES.parent), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", *launcher, str(RECIPES / script), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout
