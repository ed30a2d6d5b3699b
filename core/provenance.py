"""Provenance: every file Weightsmith writes says what it is and how it was made.

Each output's safetensors metadata (or GGUF KV) carries

* standard `modelspec.*` keys (SAI Model Spec 1.0.1, as kohya's sd-scripts writes them): `sai_model_spec`,
  `architecture` (kohya's ids: `flux-1-dev`, `flux-1-schnell`, `chroma`, `stable-diffusion-xl-v1-base`,
  `stable-diffusion-v1`, … with `/lora` for LoRAs), `implementation`, `title`, `date`, `resolution`,
  `merged_from` for merges and `hash_sha256` (see below);
* one `weightsmith.recipe` JSON (`RECIPE_FORMAT`): tool and version, the operation, every parameter, each
  input's name, path, size and content fingerprint, the rules and the seed, and how it ran (CLI, node,
  Python). `weightsmith replay` re-runs a CLI recipe;
* for LoRAs the kohya training-style keys loaders show (`ss_network_dim`, `ss_network_alpha`,
  `ss_base_model_version`) where they mean something.

Input metadata is never copied blindly: keys that describe a file (`modelspec.*`, `ss_*`, `sshs_*`, the
recipe, ComfyUI's `prompt`/`workflow`) are dropped from whatever an output inherits and written fresh.

`modelspec.hash_sha256` is "0x" + the SHA-256 of the file's tensor data section: every byte after the
8-byte header length and the JSON header, i.e. the tensors' raw little-endian bytes in file order (the
definition kohya's `precalculate_safetensors_hashes` and the SAI spec use; it does not change when only
metadata changes). `StreamingWriter` computes it while writing and fills in the placeholder
`HASH_PENDING` the metadata carries (same length, so the header does not move). GGUF outputs leave it out.

The input fingerprint (`wsfp1:`, see `fingerprint_file`) is cheap: the whole header plus 16 evenly spaced
64 KiB samples of the data, not a full hash. It catches a replaced, re-exported, re-quantized, truncated
or edited file (any header change, any change of size, changes in the sampled bytes); a change confined
to unsampled bytes of an otherwise identical file is not caught.

How a run is recorded: the CLI (`cli.main`) and the file-writing nodes wrap their work in `recording(…)`
with a `Recording` built generically from the command's argparse namespace (`cli_recording`) or the
node's inputs (`node_recording`), so an option added to a command later is recorded (and replayed)
without touching this module. Each output site calls `stamp(...)` with what only it knows (the
architecture, whether the output is a LoRA, the inputs merged).
"""

from __future__ import annotations

import contextvars
import datetime
import hashlib
import json
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RECIPE_KEY = "weightsmith.recipe"
RECIPE_FORMAT = "weightsmith.recipe/1"
FINGERPRINT_VERSION = "wsfp1"
HASH_KEY = "modelspec.hash_sha256"
HASH_PENDING = "0x" + "?" * 64  # replaced in place by StreamingWriter with "0x" + 64 hex digits
SPEC_VERSION = "1.0.1"

_output_hash: contextvars.ContextVar[bool | None] = contextvars.ContextVar("weightsmith_output_hash", default=None)


def output_hash_enabled() -> bool:
    """Whether outputs get modelspec.hash_sha256: yes, unless turned off for this run (`weightsmith --no-hash`,
    `without_output_hash()`) or by WEIGHTSMITH_HASH=0. SHA-256 runs at ~1.7 GB/s on one core (SHA-NI):
    free where a core is spare for the hashing thread, ~0.6 CPU-s per GB written where none is."""
    set_here = _output_hash.get()
    if set_here is not None:
        return set_here
    return os.environ.get("WEIGHTSMITH_HASH", "1").strip().lower() not in ("0", "off", "false", "no")


@contextmanager
def without_output_hash(off: bool = True) -> Iterator[None]:
    """Outputs written inside carry no modelspec.hash_sha256 (when `off`)."""
    token = _output_hash.set(False) if off else None
    try:
        yield
    finally:
        if token is not None:
            _output_hash.reset(token)


# metadata an input carries about itself: never inherited by an output
_DESCRIPTIVE_PREFIXES = ("modelspec.", "ss_", "sshs_")
_DESCRIPTIVE_KEYS = frozenset({RECIPE_KEY, "prompt", "workflow"})

# weightsmith architecture -> (modelspec architecture id, implementation, resolution)
_FLUX_IMPL = "https://github.com/black-forest-labs/flux"
_SGM_IMPL = "https://github.com/Stability-AI/generative-models"
_COMFY_IMPL = "https://github.com/comfyanonymous/ComfyUI"
MODELSPEC_ARCH: dict[str, tuple[str, str, str | None]] = {
    "flux-dev": ("flux-1-dev", _FLUX_IMPL, "1024x1024"),
    "flux-schnell": ("flux-1-schnell", _FLUX_IMPL, "1024x1024"),
    "flux": ("flux-1", _FLUX_IMPL, "1024x1024"),  # a LoRA for dev and schnell alike
    "chroma": ("chroma", "https://huggingface.co/lodestones/Chroma", "1024x1024"),
    "sdxl": ("stable-diffusion-xl-v1-base", _SGM_IMPL, "1024x1024"),
    "sd15": ("stable-diffusion-v1", _SGM_IMPL, "512x512"),
    "qwen-image": ("qwen-image", "https://github.com/QwenLM/Qwen-Image", "1328x1328"),
    "wan": ("wan-2", "https://github.com/Wan-Video/Wan2.1", None),
    "flux2": ("flux-2", "https://github.com/black-forest-labs/flux2", "1024x1024"),
    "lumina2": ("lumina-2", "https://github.com/Alpha-VLLM/Lumina-Image-2.0", "1024x1024"),
    "hidream": ("hidream-i1", "https://github.com/HiDream-ai/HiDream-I1", "1024x1024"),
    "sd3": ("stable-diffusion-3", _SGM_IMPL, "1024x1024"),
}
# kohya's ss_base_model_version values (what kohya-based loaders and UIs sort LoRAs by)
SS_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "flux-dev": "flux1",
                         "flux-schnell": "flux1", "chroma": "chroma", "sd3": "sd3", "lumina2": "lumina2"}
_SD3_VARIANTS = {"SD3 Medium": "-m", "SD3.5 Medium": "-5-medium", "SD3.5 Large": "-5-large"}


def tool_version() -> str:
    """The installed weightsmith version, or the one pyproject.toml beside the package names."""
    try:
        from importlib.metadata import version

        return version("weightsmith")
    except Exception:
        pass
    try:
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text("utf-8")
        m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


# --- fingerprints -------------------------------------------------------------------------------------

SAMPLES = 16
SAMPLE_BYTES = 64 << 10
HEAD_BYTES = 1 << 20  # the head of a file that is not safetensors (GGUF, .ckpt): its header lives there
_MAX_HEADER = 100 << 20


def _head_length(f, size: int) -> int:
    """Bytes of the file's header: a safetensors file's 8-byte length plus its JSON header; else 1 MiB."""
    first = f.read(8)
    if len(first) == 8:
        (n,) = struct.unpack("<Q", first)
        if 0 < n <= _MAX_HEADER and 8 + n <= size:
            f.seek(8)
            if f.read(1) == b"{":
                return 8 + n
    return min(size, HEAD_BYTES)


def fingerprint_file(path: str | os.PathLike) -> str:
    """`wsfp1:<sha256 hex>` of: "wsfp1", the file size in decimal, the header (a safetensors file's
    8-byte length + JSON header; else the first 1 MiB), then the data after it — whole when it is at most
    16 × 64 KiB, else 16 samples of 64 KiB at evenly spaced offsets, the first at the data's start and
    the last ending at the end of the file. Reads about 1 MiB plus the header, whatever the file size."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    h.update(f"{FINGERPRINT_VERSION}\0{size}\0".encode())
    with open(path, "rb") as f:
        head = _head_length(f, size)
        f.seek(0)
        h.update(f.read(head))
        rest = size - head
        if rest <= SAMPLES * SAMPLE_BYTES:
            h.update(f.read(rest))
        else:
            span = rest - SAMPLE_BYTES
            for i in range(SAMPLES):
                f.seek(head + span * i // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


_MODEL_SUFFIXES = (".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin", ".json")


def input_files(path: str | os.PathLike) -> list[Path]:
    """The files an input path stands for: itself; a folder's model files (sorted); an index file and the
    shards its weight_map names."""
    p = Path(path)
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in _MODEL_SUFFIXES)
    if p.name.endswith(".json") and p.is_file():
        try:
            shards = sorted(set(json.loads(p.read_text("utf-8")).get("weight_map", {}).values()))
            return [p, *(p.parent / s for s in shards if isinstance(s, str) and (p.parent / s).is_file())]
        except (OSError, ValueError, AttributeError):
            return [p]
    return [p]


def fingerprint_input(path: str | os.PathLike) -> dict:
    """name, absolute path, total size and fingerprint of an input (a file, a shard folder, an index).
    Several files: `wsfp1:` + sha256 over each file's name and fingerprint, in `input_files` order."""
    p = Path(path)
    files = input_files(p)
    if len(files) == 1 and files[0] == p:
        fp = fingerprint_file(p)
    else:
        h = hashlib.sha256(f"{FINGERPRINT_VERSION}-set\0".encode())
        for f in files:
            h.update(f"{f.name}\0{fingerprint_file(f)}\0".encode())
        fp = f"{FINGERPRINT_VERSION}:{h.hexdigest()}"
    return {"name": p.name, "path": str(p.resolve()), "size": sum(f.stat().st_size for f in files),
            "fingerprint": fp}


# --- recording a run ----------------------------------------------------------------------------------


@dataclass
class Recording:
    """What a run was asked to do: `operation` (the CLI command, or a node's class), `via` ("cli", "node",
    "python"), every parameter (JSON values), and the input files by role (`models[0]`, `base`, …)."""

    operation: str
    via: str
    params: dict
    inputs: list[tuple[str, str]] = field(default_factory=list)  # (role, path as given)
    _fingerprints: dict[str, dict] = field(default_factory=dict, repr=False)

    def input_records(self) -> list[dict]:
        out = []
        for role, path in self.inputs:
            rec = self._fingerprints.get(path)
            if rec is None:
                try:
                    rec = self._fingerprints[path] = fingerprint_input(path)
                except OSError as e:  # a Python caller's input that is not a file: named, not fingerprinted
                    rec = {"name": Path(path).name, "path": path, "error": str(e)}
            out.append({"role": role, "given": path, **rec})
        return out

    def recipe(self) -> dict:
        params = self.params
        return {"format": RECIPE_FORMAT, "tool": "weightsmith", "version": tool_version(),
                "operation": self.operation, "via": self.via, "params": params, "inputs": self.input_records(),
                "rules": _rules_of(params), "seed": _seed_of(params)}


_current: contextvars.ContextVar[Recording | None] = contextvars.ContextVar("weightsmith_recording", default=None)


@contextmanager
def recording(rec: Recording | None) -> Iterator[Recording | None]:
    """Outputs written inside the block carry `rec` as their recipe (an outer recording wins: a command
    that calls another records the one the user ran)."""
    if rec is None or _current.get() is not None:
        yield _current.get()
        return
    token = _current.set(rec)
    try:
        yield rec
    finally:
        _current.reset(token)


def current_recording() -> Recording | None:
    return _current.get()


def jsonable(value):
    """A parameter value as JSON: paths as text, tuples as lists, anything else as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return repr(value)


# namespace entries that say where results go or how to print, not what is computed
CLI_OUTPUT_ARGS = frozenset({"output", "report", "chart", "json"})
CLI_RUN_ONLY_ARGS = frozenset({"func", "command", "debug", "no_hash", "overwrite", "dry_run", "plan_only", "list_methods",
                               "list_presets", "list_groups", "modules"})


def _existing_path(text: str) -> str | None:
    """`text` when it names an existing file or folder, or the path part of `PATH:STRENGTH`."""
    if not text:
        return None
    if Path(text).exists():
        return text
    head, sep, tail = text.rpartition(":")
    if sep and head and Path(head).exists():
        try:
            float(tail)
            return head
        except ValueError:
            return None
    return None


def cli_recording(args) -> Recording:
    """The recipe of a CLI run, from its argparse namespace: every option is a parameter; every value
    (or list item) that names an existing file or folder — and is not an output — is an input, by role
    `dest` or `dest[i]`."""
    params, inputs = {}, []
    for dest, value in sorted(vars(args).items()):
        if dest in CLI_RUN_ONLY_ARGS or callable(value):
            continue
        params[dest] = jsonable(value)
        if dest in CLI_OUTPUT_ARGS:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if isinstance(item, (str, os.PathLike)):
                path = _existing_path(os.fspath(item))
                if path is not None:
                    inputs.append((dest if not isinstance(value, (list, tuple)) else f"{dest}[{i}]", path))
    return Recording(str(getattr(args, "command", "")), "cli", params, inputs)


def node_recording(node_class: str, kwargs: Mapping, inputs: Iterable[tuple[str, str | os.PathLike]] = ()) -> Recording:
    """The recipe of a node run: its widget values (JSON-able inputs; graph objects such as MODEL or
    LORA are named by their type) and the files it read."""
    params = {}
    for k, v in sorted(kwargs.items()):
        if k == "unique_id":
            continue
        params[k] = jsonable(v) if isinstance(v, (bool, int, float, str, type(None))) else \
            {"graph_input": type(v).__name__, **({"recipe": r} if (r := attached_recipe(v)) else {})}
    return Recording(node_class, "node", params, [(role, os.fspath(p)) for role, p in inputs])


def attached_recipe(obj) -> dict | None:
    """The recipe a node attached to a LoRA it made (`attach_recipe`), if any."""
    return getattr(obj, "_weightsmith_recipe", None)


def attach_recipe(obj, recipe: dict) -> None:
    """Remember on a graph object (a LoRA made by a node) how it was made, so the node that saves it can
    record the whole chain."""
    try:
        object.__setattr__(obj, "_weightsmith_recipe", recipe)
    except (AttributeError, TypeError):
        pass


def _rules_of(params: Mapping) -> list[str]:
    rules: list[str] = []
    for k in ("preset", "rule", "rules"):
        v = params.get(k)
        if isinstance(v, str):
            rules += [line.strip() for line in v.splitlines() if line.strip()]
        elif isinstance(v, list):
            rules += [str(x) for x in v]
    return [r for r in rules if r.lower() != "none"]  # a node's preset widget says "none" for no preset


def _seed_of(params: Mapping):
    if "seed" in params:
        return params["seed"]
    for item in params.get("param") or []:  # merge's --param seed=7
        k, _, v = str(item).partition("=")
        if k.strip() == "seed":
            try:
                return int(v)
            except ValueError:
                return v.strip()
    return None


# --- the metadata of an output ------------------------------------------------------------------------


def inherited(meta: Mapping[str, str] | None) -> dict[str, str]:
    """An input's (or a LoRA object's) metadata without the keys that describe that file."""
    return {k: v for k, v in (meta or {}).items() if isinstance(k, str) and isinstance(v, str)
            and k not in _DESCRIPTIVE_KEYS and not k.startswith(_DESCRIPTIVE_PREFIXES)}


def modelspec_architecture(arch: str, lora: bool = False, details: Mapping | None = None) -> str | None:
    """The modelspec id of a weightsmith architecture (None when unknown: no id is better than a wrong one)."""
    spec = MODELSPEC_ARCH.get(arch)
    if spec is None:
        return None
    ident = spec[0]
    details = details or {}
    if arch == "wan":
        version = str(details.get("version", ""))
        ident = {"2.1": "wan-2.1", "2.2": "wan-2.2"}.get(version, "wan-2")
    elif arch == "sd3":
        ident += _SD3_VARIANTS.get(str(details.get("variant", "")), "")
    return ident + ("/lora" if lora else "")


def _title(path) -> str:
    return Path(path).stem if path else "weightsmith output"


def merged_from(sources: Sequence) -> str:
    """kohya's `merged_from`: each input's own modelspec title, else its file name without suffix."""
    names = []
    for s in sources:
        meta = getattr(s, "metadata", {}) or {}
        names.append(meta.get("modelspec.title") or Path(str(getattr(s, "name", s))).stem)
    return ", ".join(names)


def lora_training_keys(lora, arch: str) -> dict[str, str]:
    """kohya's ss_network_dim / ss_network_alpha (one value, or "Dynamic" when modules differ) and
    ss_base_model_version, from the low-rank terms a LoRA holds; nothing when it has none."""
    ranks, alphas = set(), set()
    for m in lora.modules.values():
        for t in m.terms:
            ranks.add(int(t.rank))
            alphas.add(float(t.alpha) if t.alpha is not None else float(t.rank))
    out = {}
    if ranks:
        out["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
        out["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    if arch in SS_BASE_MODEL_VERSION:
        out["ss_base_model_version"] = SS_BASE_MODEL_VERSION[arch]
    return out


def stamp(meta: Mapping[str, str] | None, *, output, operation: str, arch: str, lora=None,
          details: Mapping | None = None, sources: Sequence = (), merged: bool | Sequence[str] = False,
          naming: str = "", summary: Mapping | None = None, hashed: bool = True) -> dict[str, str]:
    """The metadata of an output: `meta` without what described its inputs, plus fresh modelspec keys,
    the recipe (the current recording, or one naming `operation`, `sources` and `summary` for a direct
    Python call) and, for a LoRA (`lora` given), the ss_* keys. `arch` is the weightsmith architecture
    (of the model, or the LoRA's); `merged`: True lists the sources in modelspec.merged_from, a list of
    names lists those; `hashed`: ask the
    writer for modelspec.hash_sha256."""
    out = inherited(meta)
    is_lora = lora is not None
    spec_arch = modelspec_architecture(arch, is_lora, details)
    impl = MODELSPEC_ARCH.get(arch, (None, _COMFY_IMPL, None))[1]
    if naming == "diffusers":
        impl = "diffusers"
    out.update({"modelspec.sai_model_spec": SPEC_VERSION, "modelspec.implementation": impl,
                "modelspec.title": _title(output),
                "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()})
    if spec_arch is not None:
        out["modelspec.architecture"] = spec_arch
    resolution = MODELSPEC_ARCH.get(arch, (None, None, None))[2]
    if resolution:
        out["modelspec.resolution"] = resolution
    if merged:  # True: the sources; a list: these names
        names = merged_from(sources) if merged is True else ", ".join(Path(str(n)).stem for n in merged)
        if names:
            out["modelspec.merged_from"] = names
    if hashed and output_hash_enabled():
        out[HASH_KEY] = HASH_PENDING
    if is_lora:
        out.update(lora_training_keys(lora, arch))
    rec = current_recording()
    if rec is not None:
        recipe = rec.recipe()
    else:
        recipe = Recording(operation, "python", jsonable(dict(summary or {})), _source_inputs(sources)).recipe()
    if rec is not None and not rec.inputs and sources:  # a node names its widgets; the files are known here
        rec = Recording(rec.operation, rec.via, rec.params, _source_inputs(sources))
        recipe = rec.recipe()
    if rec is None or (rec.via != "cli" and rec.operation != operation):
        recipe["step"] = operation  # which part of the run wrote this file (e.g. "merge" inside a node)
    out[RECIPE_KEY] = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return out


def _source_inputs(sources: Sequence) -> list[tuple[str, str]]:
    """(role, path) of the files behind sources (TensorSources or paths)."""
    paths = [os.fspath(p) for s in sources
             for p in (s.paths() if hasattr(s, "paths") else [s] if isinstance(s, (str, os.PathLike)) else [])]
    return [(f"inputs[{i}]", p) for i, p in enumerate(paths)]


def drop_pending_hash(meta: Mapping[str, str]) -> dict[str, str]:
    """Metadata for a writer that cannot fill in the data hash (GGUF): without the placeholder."""
    return {k: v for k, v in meta.items() if not (k == HASH_KEY and v == HASH_PENDING)}


# --- reading provenance back --------------------------------------------------------------------------


def read_recipe(meta: Mapping[str, str]) -> dict | None:
    raw = meta.get(RECIPE_KEY)
    if not raw:
        return None
    try:
        recipe = json.loads(raw)
    except ValueError:
        return None
    return recipe if isinstance(recipe, dict) else None


def describe(meta: Mapping[str, str]) -> list[str]:
    """Readable lines for `inspect` and the Load LoRA node: the modelspec keys, the ss_* summary, and the
    recipe (operation, parameters, inputs with size and fingerprint)."""
    lines = []
    spec = {k[len("modelspec."):]: v for k, v in meta.items() if k.startswith("modelspec.")}
    if spec:
        lines.append("modelspec:")
        for k in sorted(spec):
            lines.append(f"  {k}: {spec[k]}")
    ss = {k: v for k, v in meta.items() if k in ("ss_network_dim", "ss_network_alpha", "ss_base_model_version")}
    if ss:
        lines.append("training-style keys: " + ", ".join(f"{k}={v}" for k, v in sorted(ss.items())))
    recipe = read_recipe(meta)
    if recipe is None:
        if RECIPE_KEY in meta:
            lines.append(f"{RECIPE_KEY}: present but not valid JSON")
        elif not spec:
            lines.append("provenance: none recorded (not written by weightsmith, or by an older version)")
        return lines
    lines += describe_recipe(recipe)
    return lines


def describe_recipe(recipe: Mapping, indent: str = "") -> list[str]:
    lines = [f"{indent}recipe: weightsmith {recipe.get('version', '?')} {recipe.get('operation', '?')} "
             f"(via {recipe.get('via', '?')}" + (f", step {recipe['step']}" if recipe.get("step") else "") + ")"]
    params = recipe.get("params") or {}
    for k in sorted(params):
        v = params[k]
        if isinstance(v, dict) and "recipe" in v:
            lines.append(f"{indent}  {k}: {v.get('graph_input', '')} made by:")
            lines += describe_recipe(v["recipe"], indent + "    ")
            continue
        if v in (None, [], "", False) and k not in ("seed",):
            continue
        lines.append(f"{indent}  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    if recipe.get("rules"):
        lines.append(f"{indent}  rules: " + "; ".join(recipe["rules"]))
    if recipe.get("seed") is not None:
        lines.append(f"{indent}  seed: {recipe['seed']}")
    for inp in recipe.get("inputs") or []:
        lines.append(f"{indent}  input {inp.get('role', '?')}: {inp.get('name', '?')} ({inp.get('size', '?')} bytes, "
                     f"{inp.get('fingerprint', '?')}) at {inp.get('path', '?')}")
    return lines
