"""Output paths that stay where they belong.

Node inputs can come from a stranger's API call (ComfyUI is often run with --listen), so every output
name is checked: no absolute paths, no `..`, no NUL or control characters, no over-long names, and the
resolved path must lie inside the allowed folder. Files are never overwritten: a counter picks the next
free name, ComfyUI-style (`prefix_00001_.safetensors`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from .errors import OutputPathError

# What the writers produce: every output file is safetensors (a `.ckpt` name would hold safetensors bytes
# that torch.load, and this tool, then refuse as a pickle). GGUF output, where a command offers it, is
# allowed by that command alone (`check_output_suffix(path, WRITTEN_SUFFIXES + (".gguf",))`).
WRITTEN_SUFFIXES = (".safetensors", ".sft")

# Secondary outputs by what they hold (`check_new_output`'s `what`): a JSON report without `.json`, or a chart
# without `.png`, is a file no viewer opens by its name.
SECONDARY_SUFFIXES = {"report": ".json", "JSON summary": ".json", "chart": ".png"}

MAX_COMPONENT = 180  # bytes; leaves room for the counter and extension under the usual 255 limit
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f<>:\"|?*\\]")


def check_relative_name(name: str, what: str = "output name") -> list[str]:
    """Split a user-supplied relative name ('sub/dir/prefix') into safe components, or refuse it."""
    if not isinstance(name, str) or not name.strip():
        raise OutputPathError(f"{what} is empty; give a file name prefix such as 'weightsmith/merged'")
    if "\x00" in name:
        raise OutputPathError(f"{what} contains a NUL character; remove it")
    if name.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", name) or name.startswith("\\\\"):
        raise OutputPathError(f"{what} {name!r} is absolute; give a name relative to the output folder")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise OutputPathError(f"{what} {name!r} has no file name; give one such as 'weightsmith/merged'")
    for p in parts:
        if p == "..":
            raise OutputPathError(f"{what} {name!r} climbs out of the output folder with '..'; give a name inside it, "
                                  "such as 'weightsmith/merged'")
        if _BAD_CHARS.search(p):
            raise OutputPathError(f"{what} {name!r} contains characters not allowed in file names; use letters, digits, "
                                  "'-', '_', '.' and '/' between sub-folders")
        if len(p.encode("utf-8")) > MAX_COMPONENT:
            raise OutputPathError(f"{what}: the component {p[:40]!r}… is longer than {MAX_COMPONENT} bytes; shorten it")
    return parts


def check_output_suffix(path: str | os.PathLike, allowed: Iterable[str] = WRITTEN_SUFFIXES) -> Path:
    """Refuse an output name whose suffix promises a format we do not write there (`out.ckpt`, `out.pt`)."""
    path = Path(path)
    allowed = tuple(allowed)
    if path.suffix.lower() not in allowed:
        raise OutputPathError(f"output {path}: this command writes {' or '.join(allowed)} files, but the name ends "
                              f"in {path.suffix or '(no suffix)'!r} (another tool, or this one, would then read it "
                              f"as that format); give the output a {' or '.join(allowed)} name")
    return path


def _shard_folders(p: Path) -> list[Path]:
    """Folders that make up input `p` as a sharded model: the folder itself, or an index file's folder."""
    if p.is_dir():
        return [p]
    if p.name.lower().endswith(".index.json"):
        return [p.parent]
    return []


def refuse_input_target(path: str | os.PathLike, protect: Iterable[str | os.PathLike], what: str = "output",
                        into_shard_folders: bool = True) -> None:
    """Refuse to write `path` if it is one of the inputs in `protect` (the same path, through a symlink,
    or a hard link of it), or, for model outputs (`into_shard_folders`), if it lands in the folder of a
    sharded input (folder or `*.index.json`), where it would be read as one more shard of that model."""
    path = check_name_fits(path, what)  # resolve() of an over-long name fails with ENAMETOOLONG
    target = path.resolve()
    exists = target.exists()
    for p in protect:
        p = Path(p)
        try:
            if not p.exists():
                continue
            if p.resolve() == target or (exists and os.path.samefile(p, target)):
                if what == "output":
                    raise OutputPathError(f"refusing to write {path}: it is one of the inputs ({p}); choose another "
                                          "output name")
                raise OutputPathError(f"refusing to write the {what} to {path}: it is one of the inputs ({p}); "
                                      f"choose another file name for the {what}")
            for folder in _shard_folders(p):
                if exists and any(f.is_file() and os.path.samefile(f, target) for f in folder.iterdir()):
                    raise OutputPathError(f"refusing to write {path}: it is a link to a file of the sharded input "
                                          f"{p}; choose another {'output' if what == 'output' else what} name")
                if into_shard_folders and folder.resolve() == target.parent:
                    raise OutputPathError(
                        f"refusing to write {path}: it lies in {folder}, the folder of the sharded input {p}, where "
                        "it would be taken for one more shard of that model (or replace one); choose an output in another "
                        "folder")
        except OSError:
            continue


def inside(root: Path, path: Path) -> bool:
    root = root.resolve()
    path = path.resolve()
    return path == root or root in path.parents


def next_free_path(root: str | os.PathLike, prefix: str, ext: str = ".safetensors") -> Path:
    """`root/sub/prefix_NNNNN_.ext` with the first counter not taken; sub-folders are created."""
    root = Path(root)
    parts = check_relative_name(prefix, "filename prefix")
    folder = root.joinpath(*parts[:-1])
    if not inside(root, folder):
        raise OutputPathError(f"filename prefix {prefix!r} resolves outside {root}; choose a sub-folder inside it")
    folder.mkdir(parents=True, exist_ok=True)
    if not inside(root, folder):  # a symlinked sub-folder pointing elsewhere
        raise OutputPathError(f"filename prefix {prefix!r} resolves outside {root}; choose a sub-folder inside it")
    stem = parts[-1]
    taken = set()
    pat = re.compile(re.escape(stem) + r"_(\d+)_" + re.escape(ext) + "$")
    for f in folder.iterdir():
        m = pat.match(f.name)
        if m:
            taken.add(int(m.group(1)))
    counter = max(taken, default=0) + 1
    return folder / f"{stem}_{counter:05}_{ext}"


def name_max(folder: Path) -> int:
    """The longest file name (in bytes) the folder's file system allows (255 on ext4, NTFS, APFS)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or a folder that does not exist yet
        return 255


def check_name_fits(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse an output name longer than the file system allows, before anything is opened (the OS
    would fail with ENAMETOOLONG deep in a write)."""
    path = Path(path)
    limit = name_max(path.parent if path.parent.is_dir() else Path("."))
    size = len(os.fsencode(path.name))
    if size > limit:
        raise OutputPathError(f"{what} file name {path.name[:40]!r}… is {size} bytes long, more than the {limit} "
                              "bytes the file system allows; shorten it")
    return path


def _temp_name(name: str, token: str, limit: int) -> str:
    """`.NAME.TOKEN.tmp`, with NAME cut (at a character boundary) so that the whole fits `limit` bytes:
    an output name the file system allows must never fail because of its temp name. A cut NAME is a
    prefix of the output name, which is how `remove_stale_temps` still attributes it."""
    room = limit - len(f"..{token}.tmp")
    stem = name
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return f".{stem}.{token}.tmp"


def hidden_name_beside(target: Path) -> Path:
    """A fresh hidden name beside `target`: `.NAME.<pid>-<random>.tmp`. The pid lets a later run tell the
    temp file of a killed process (SIGKILL cannot be caught) from one still being written. NAME is
    shortened where the whole would exceed the file system's name limit."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return target.parent / _temp_name(target.name, token, name_max(target.parent))


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")


def _process_runs(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates the process: never probe, assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it runs
        return True
    return True


def remove_stale_temps(folder: Path, name: str) -> list[Path]:
    """Remove hidden temp files for output `name` in `folder` left by processes that no longer run (a
    SIGKILL'd or crashed run: no code of ours could clean up after it). Temp files of running processes
    are kept; so are names without a pid (older versions), which nothing can attribute."""
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry)
        if m is None or not name.startswith(m.group("name")):
            continue
        pid = int(m.group("pid"))
        if pid == os.getpid() or _process_runs(pid):
            continue
        try:
            os.unlink(folder / entry)
            removed.append(folder / entry)
        except OSError:
            continue
    if removed:
        logging.getLogger("weightsmith").warning(
            "removed %d temp file(s) beside %s left by a run that was killed: %s", len(removed), folder / name,
            ", ".join(p.name for p in removed))
    return removed


def create_temp_beside(folder: Path, name: str) -> tuple[int, Path]:
    """A new hidden temp file beside the target, created with the umask's permissions like any other
    file (tempfile.mkstemp would make it 0600, and the rename would keep that); opened for reading too (the
    writer reads back what it hashes). Stale temp files of the
    same output left by killed runs are removed first."""
    remove_stale_temps(folder, name)
    for _ in range(100):
        tmp = hidden_name_beside(folder / name)  # fits the file system's name limit
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp file name beside {folder / name}")


def write_new_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write a small file (a JSON report, a chart) atomically and never over an existing file: a report
    path that names an input model must not destroy it. Inside `outputs.output_set()` it is placed
    together with the run's other outputs."""
    from .outputs import place_or_defer

    path = check_name_fits(path, "the")
    if path.exists():
        raise OutputPathError(f"refusing to overwrite existing file {path}; choose another name or remove it")
    if not path.parent.is_dir():
        raise OutputPathError(f"folder {path.parent} does not exist; create it or choose another path for {path.name}")
    try:
        fd, tmp = create_temp_beside(path.parent, path.name)
    except OSError as e:
        raise OutputPathError(f"could not create a file in {path.parent} for {path.name}: {e}; check the folder's "
                              "permissions and free space") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        os.unlink(tmp)
        raise OutputPathError(f"could not write {path}: {e}; free disk space and retry") from e
    except BaseException:
        os.unlink(tmp)
        raise
    place_or_defer(tmp, path)
    return path


def check_new_output(
    path: str | os.PathLike,
    what: str = "report",
    protect: Iterable[str | os.PathLike] = (),
    others: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Check a secondary output (`--report`, `--chart`, `--json`) before any work is done, so a bad path
    fails at once instead of after a long merge: it must not be an input (`protect`), already exist,
    or be another output of the same command (`others`, e.g. `-o`), and its folder must exist.
    The final write (`write_new_file`) still refuses to overwrite; this only makes the refusal early."""
    path = check_name_fits(path, f"the {what}")
    target = path.resolve()
    for p in protect:
        p = Path(p)
        try:
            if p.resolve() == target or (path.exists() and p.exists() and os.path.samefile(p, path)):
                raise OutputPathError(f"refusing to write the {what} to {path}: it is one of the inputs ({p}); "
                                      f"choose another file name for the {what}")
        except OSError:
            continue
    for o in others:
        if o is not None and Path(o).resolve() == target:
            raise OutputPathError(f"the {what} path {path} is also another output of this command; "
                                  f"choose a different file name for the {what}")
    if path.exists() or path.is_symlink():
        raise OutputPathError(f"refusing to overwrite existing file {path} with the {what}; choose another name "
                              "or remove it")
    suffix = SECONDARY_SUFFIXES.get(what)
    if suffix is not None and path.suffix.lower() != suffix:
        raise OutputPathError(f"the {what} {path} is written as {suffix[1:].upper()}, but the name ends in "
                              f"{path.suffix or '(no suffix)'!r}; give it a {suffix} name (e.g. "
                              f"{path.with_suffix(suffix).name})")
    if not target.parent.is_dir():
        raise OutputPathError(f"folder {path.parent} does not exist; create it or choose another path for the {what}")
    check_writable_folder(target.parent, f"the {what}")
    return path


def check_writable_folder(folder: Path, what: str) -> None:
    """Refuse a folder this process cannot create files in (read-only, or a read-only file system) before
    any work is done, instead of after a long run whose other outputs would then be thrown away."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"folder {folder} is not writable (read-only, or no permission); choose another "
                              f"folder for {what} or make it writable")
