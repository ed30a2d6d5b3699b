"""All outputs of one run committed together, or none of them.

A command that writes a model and a report must not leave the model behind when the report cannot be
written (a read-only folder, a full disk, a report file that appeared meanwhile): the user would be left
with a result whose record is missing and could not tell a finished run from a failed one. Writers
(`StreamingWriter`, `paths.write_new_file`) write each output completely to a hidden temp file beside
its target and then call `place_or_defer`: inside `output_set()` the temp file is handed to the set,
which moves every one into place at the end; if any cannot be placed, the outputs already placed are
taken back (a replaced file gets its old content back) and every temp file is removed. Outside a set
(a node in ComfyUI writes one file) the temp file is placed at once.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputPathError

_current: contextvars.ContextVar[OutputSet | None] = contextvars.ContextVar("weightsmith_output_set", default=None)


@dataclass
class _Pending:
    tmp: Path  # the complete output, hidden beside its target
    target: Path
    overwrite: bool
    check: Callable[[], None] | None  # re-checks the target just before it is placed (inputs, existing file)
    backup: Path | None = None  # the replaced file's old content, while the set is not yet complete
    placed: str = ""  # "link" (tmp still holds the same inode), "rename", or "" (not placed)


def _refuse_existing(path: Path) -> OutputPathError:
    return OutputPathError(f"refusing to overwrite existing file {path}; choose another name or remove it")


def _place(p: _Pending) -> None:
    """Move one temp file to its target: a hard link, which never replaces a file that appeared meanwhile,
    or (with overwrite) a rename over the old file, whose content stays linked under a hidden name until
    the whole set is in place."""
    if p.overwrite and p.target.exists():
        from .paths import hidden_name_beside

        backup = hidden_name_beside(p.target)
        try:
            os.link(p.target, backup)
            p.backup = backup
        except OSError:  # no hard links here: the old file cannot be kept, as with a plain rename
            p.backup = None
        os.replace(p.tmp, p.target)
        p.placed = "rename"
        return
    try:
        os.link(p.tmp, p.target)  # atomic and never clobbers
        p.placed = "link"
    except FileExistsError:
        raise _refuse_existing(p.target) from None
    except OSError:  # a file system without hard links
        if p.target.exists() or p.target.is_symlink():
            raise _refuse_existing(p.target) from None
        os.replace(p.tmp, p.target)
        p.placed = "rename"


def _take_back(p: _Pending) -> None:
    """Undo `_place`, leaving the target as it was before this run."""
    try:
        if p.placed == "link":
            if os.path.samefile(p.tmp, p.target):
                os.unlink(p.target)
        elif p.placed == "rename":
            if p.backup is not None:
                os.replace(p.backup, p.target)
                p.backup = None
            else:
                os.unlink(p.target)
    except OSError:
        pass
    p.placed = ""


def _remove(path: Path | None) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass


class OutputSet:
    """The outputs of one run, placed together by `commit` or removed together by `abort`."""

    def __init__(self) -> None:
        self._pending: list[_Pending] = []

    def add(self, tmp: Path, target: Path, overwrite: bool = False, check: Callable[[], None] | None = None) -> None:
        self._pending.append(_Pending(Path(tmp), Path(target), overwrite, check))

    @property
    def targets(self) -> list[Path]:
        return [p.target for p in self._pending]

    def commit(self) -> list[Path]:
        """Place every output; on any failure take back those placed, remove every temp file and raise
        an OutputPathError that says nothing of this run was kept."""
        # Files that must not exist yet go first (each link can fail on its own); replacements last.
        order = sorted(self._pending, key=lambda p: p.overwrite)
        current = None
        try:
            for current in order:
                if current.check is not None:
                    current.check()
                _place(current)
        except BaseException as e:
            for p in order:
                _take_back(p)
            self.abort()
            if not isinstance(e, (OSError, OutputPathError)):
                raise
            target = current.target if current is not None else None
            others = [p.target.name for p in order if p is not current]
            kept = (f"; nothing of this run was kept (also not {', '.join(others)}): a run's outputs are written "
                    "together or not at all") if others else ""
            if isinstance(e, OutputPathError):
                raise OutputPathError(f"{e}{kept}") from e
            raise OutputPathError(f"could not write {target}: {e}; check the folder's permissions and free disk "
                                  f"space{kept}") from e
        for p in order:
            _remove(p.tmp)
            _remove(p.backup)
        self._pending.clear()
        return [p.target for p in order]

    def abort(self) -> None:
        """Remove every temp file of the set (nothing was placed, or it was taken back)."""
        for p in self._pending:
            _remove(p.tmp)
            _remove(p.backup)
        self._pending.clear()


def current_output_set() -> OutputSet | None:
    return _current.get()


@contextmanager
def output_set(join: bool = True) -> Iterator[OutputSet]:
    """Collect the outputs written inside the block and place them together when it ends cleanly; an
    exception removes them all. Nested blocks join the outermost one, unless `join` is False (`replay`
    reads back what it wrote before its run ends)."""
    outer = _current.get()
    if outer is not None and join:
        yield outer
        return
    s = OutputSet()
    token = _current.set(s)
    try:
        yield s
    except BaseException:
        _current.reset(token)
        s.abort()
        raise
    _current.reset(token)
    s.commit()


def place_or_defer(tmp: Path, target: Path, overwrite: bool = False, check: Callable[[], None] | None = None) -> None:
    """Hand a complete temp file to the current output set, or place it now when there is none. Either
    way the temp file is the callee's from here on: it is placed or removed."""
    s = _current.get()
    if s is not None:
        s.add(tmp, target, overwrite, check)
        return
    single = OutputSet()
    single.add(tmp, target, overwrite, check)
    single.commit()
