"""Every node run is recorded (core/provenance.py): the node's class, its widget values and the model
files it read; files the run writes carry that recipe, and a LoRA a node makes remembers it, so the node
that saves it records the whole chain (Load LoRA -> Convert -> Compose -> Save LoRA)."""

from __future__ import annotations

import functools
import inspect

from ..core.lora.model import LoRA
from ..core.provenance import attach_recipe, node_recording, recording
from .common import MODEL_FILE_FOLDERS, input_path, resolve_model_file

_FILE_WIDGETS = {"lora_name": "loras"}  # widgets that pick a file from a ComfyUI folder, besides model choices


def _files(kwargs: dict) -> list[tuple[str, str]]:
    """(widget, path) of the files the widgets pick; a value that resolves to no file is only a parameter."""
    out = []
    for k, v in sorted(kwargs.items()):
        if not isinstance(v, str) or not v:
            continue
        try:
            if k in _FILE_WIDGETS:
                out.append((k, str(input_path(_FILE_WIDGETS[k], v))))
            elif v.partition("/")[0] in MODEL_FILE_FOLDERS:
                out.append((k, str(resolve_model_file(v))))
        except Exception:  # the node itself reports a missing file, naming it
            continue
    return out


def _outputs(result) -> tuple:
    if isinstance(result, dict):
        result = result.get("result", ())
    return result if isinstance(result, tuple) else ()


def _recorded(name: str, fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(self, *args, **kwargs):
        try:  # ComfyUI passes inputs by name; a direct call may pass them in order
            named = dict(signature.bind(self, *args, **kwargs).arguments)
            named.pop(next(iter(signature.parameters)), None)
            for p in signature.parameters.values():  # **settings of a node: its widgets, by name
                if p.kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(named.pop(p.name, None) or {})
        except TypeError:
            named = dict(kwargs)
        rec = node_recording(name, named, _files(named))
        with recording(rec):
            result = fn(self, *args, **kwargs)
        made = [o for o in _outputs(result) if isinstance(o, LoRA)]
        if made:
            recipe = rec.recipe()
            for lora in made:
                attach_recipe(lora, recipe)
        return result

    run._weightsmith_recorded = True
    return run


def record_runs(mappings: dict) -> None:
    """Wrap each node class's FUNCTION so its runs are recorded (once per class)."""
    for name, cls in mappings.items():
        fn = getattr(cls, getattr(cls, "FUNCTION", ""), None)
        if fn is not None and not getattr(fn, "_weightsmith_recorded", False):
            setattr(cls, cls.FUNCTION, _recorded(name, fn))
