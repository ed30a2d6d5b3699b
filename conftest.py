"""pytest sees the repo root as a package (ComfyUI needs its `__init__.py`) and would import it, and so
every node module and ComfyUI, before any test. Collect the root as a plain directory instead: tests
import the pack explicitly (tests/comfy_support.py: import_pack) or run it in a real ComfyUI server."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def pytest_collect_directory(path, parent):
    if path == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
