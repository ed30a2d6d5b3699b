"""Errors that name the file and key involved and say what to do (they reach users verbatim)."""

from __future__ import annotations


def _public_module(module: str) -> str:
    """The module name an error type shows. ComfyUI imports a custom-node pack under its folder's path
    (`/…/custom_nodes/weightsmith.core.errors`) and reports `exception_type` from it: keep the dotted tail."""
    return module.replace("\\", "/").rsplit("/", 1)[-1]


class WeightsmithError(Exception):
    """Base for every error raised on purpose by the core."""

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.__module__ = _public_module(cls.__module__)


class BadFileError(WeightsmithError):
    """A weight file is unreadable, corrupt, unsafe or of an unsupported kind."""


class UnsafePickleError(BadFileError):
    """A .ckpt/.pt file needs arbitrary pickle code to load; it is refused unexecuted."""


class MismatchError(WeightsmithError):
    """Inputs disagree (shapes, dtypes, architectures) in a way no rule resolves."""


class OutputPathError(WeightsmithError):
    """An output name would leave the allowed folder, overwrite an input, or is otherwise unsafe."""


class UnsupportedEncodingError(BadFileError):
    """A weight file stores some tensors in a quantized encoding this pack cannot decode exactly."""


WeightsmithError.__module__ = _public_module(WeightsmithError.__module__)
