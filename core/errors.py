"""Errors that name the file and key involved and say what to do (they reach users verbatim)."""

from __future__ import annotations


class WeightsmithError(Exception):
    """Base for every error raised on purpose by the core."""


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
