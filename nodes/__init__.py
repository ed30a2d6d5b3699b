"""Node classes, one module per capability; each module exports NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS, gathered here so modules never edit a shared list."""

import importlib
import pkgutil

from ._provenance import record_runs

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name.startswith("_") or _info.name == "common":
        continue
    _mod = importlib.import_module(f"{__name__}.{_info.name}")
    NODE_CLASS_MAPPINGS.update(getattr(_mod, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))

record_runs(NODE_CLASS_MAPPINGS)  # every run's recipe goes into the files it writes (core/provenance.py)
