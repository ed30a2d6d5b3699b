"""The real ComfyUI server with the pack, for end-to-end and browser tests and for `scripts/demo.py`.

`start_server(base_dir)` lays out a private ComfyUI world under `base_dir` (model folders that come FIRST
in ComfyUI's lists, so outputs land there; output/input/temp/user folders; an in-memory database), starts
`main.py --cpu` on a free loopback port with its log in a file, and waits until `/object_info` answers.
`ComfyClient` speaks ComfyUI's HTTP + websocket API the way the frontend does.

Nothing here imports ComfyUI: the server is a subprocess, exactly as a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "weightsmith"
MODEL_FOLDERS = ("diffusion_models", "loras", "checkpoints")

# Log lines that mean a workflow silently did the wrong thing (ComfyUI only logs these, it never fails).
LOG_PROBLEMS = ("lora key not loaded", "NOT LOADED", "WARNING SHAPE MISMATCH", "unet missing")


def comfy_dir() -> Path:
    return Path(os.environ.get("COMFYUI_PATH") or ROOT / ".comfyui" / "ComfyUI")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base_dir: str | Path) -> Path:
    """Create the folders a private ComfyUI needs under `base_dir` (idempotent)."""
    base = Path(base_dir).resolve()
    for sub in [*(f"models/{f}" for f in MODEL_FOLDERS), "output", "input", "temp", "user", "custom_nodes"]:
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


def _pack_linked(comfy: Path) -> bool:
    link = comfy / "custom_nodes" / PACK_NAME
    return link.exists() and link.resolve() == ROOT


def write_paths_yaml(base: Path, extra_model_roots: list[Path] = ()) -> Path:
    """An extra-model-paths yaml: `base/models/*` are the default (first) folders; `extra_model_roots`
    (e.g. a cache of demo models) come after. The pack is added as a custom node only when the
    ComfyUI tree does not already link it (loading it twice would register every node twice)."""
    lines = ["weightsmith_test:", f"    base_path: {base}", "    is_default: true"]
    lines += [f"    {f}: models/{f}" for f in MODEL_FOLDERS]
    if not _pack_linked(comfy_dir()):
        link = base / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        lines.append("    custom_nodes: custom_nodes")
    for i, root in enumerate(extra_model_roots):
        lines += [f"weightsmith_extra_{i}:", f"    base_path: {Path(root).resolve()}"]
        lines += [f"    {f}: {f}" for f in MODEL_FOLDERS]
    path = base / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


class ServerError(RuntimeError):
    pass


@dataclass
class ServerHandle:
    """A running ComfyUI: `url`, `base_dir`, `log_path`; `stop()` ends it (idempotent)."""

    proc: subprocess.Popen
    url: str
    port: int
    base_dir: Path
    log_path: Path
    _log_file: object = field(default=None, repr=False)
    owns_base: bool = False  # a test server's temp world: removed (models included) by dispose()

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def models_dir(self, folder: str) -> Path:
        return self.base_dir / "models" / folder

    def client(self) -> ComfyClient:
        return ComfyClient(self.url)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_problems(self) -> list[str]:
        """Lines of the server log that show a broken pack or a silently wrong load."""
        bad = []
        for line in self.log_text().splitlines():
            if "(IMPORT FAILED)" in line and PACK_NAME in line:
                bad.append(line)
            elif "Cannot import" in line and PACK_NAME in line:
                bad.append(line)
            elif any(p in line for p in LOG_PROBLEMS):
                bad.append(line)
        return bad

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # ComfyUI shuts down cleanly on Ctrl-C
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def dispose(self, keep_log_in: str | Path | None = None) -> None:
        """Stop, keep a copy of the log (e.g. in test-artifacts/), and delete a temp base dir we created."""
        self.stop()
        if keep_log_in is not None and self.log_path.exists():
            copy_log(self, keep_log_in)
        if self.owns_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: have Linux end the server if the test run that started it is killed (no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_server(base_dir: str | Path, port: int | None = None, log_path: str | Path | None = None,
                 extra_model_roots: list[str | Path] = (), extra_args: list[str] = (),
                 listen: str = "127.0.0.1", timeout: float = 240.0) -> ServerHandle:
    """Start ComfyUI (`--cpu`, the real frontend) rooted in `base_dir` and wait until it serves `/object_info`.

    Raises ServerError with the log's tail when it exits or does not answer within `timeout` seconds."""
    comfy = comfy_dir()
    if not (comfy / "main.py").is_file():
        raise ServerError(f"no ComfyUI at {comfy}; run scripts/setup_env.sh (or set COMFYUI_PATH)")
    base = prepare_base(base_dir)
    yaml_path = write_paths_yaml(base, [Path(r) for r in extra_model_roots])
    port = port or free_port()
    log_path = Path(log_path) if log_path else base / "comfyui.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "main.py", "--cpu", "--listen", listen, "--port", str(port),
        "--disable-auto-launch", "--disable-api-nodes",
        "--output-directory", str(base / "output"), "--input-directory", str(base / "input"),
        "--temp-directory", str(base / "temp"), "--user-directory", str(base / "user"),
        "--database-url", "sqlite:///:memory:",
        "--extra-model-paths-config", str(yaml_path), *extra_args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_file = open(log_path, "w")  # noqa: SIM115 - owned by the handle, closed in stop()
    proc = subprocess.Popen(cmd, cwd=comfy, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    handle = ServerHandle(proc, f"http://{listen}:{port}", port, base, log_path, log_file)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            handle.stop()
            raise ServerError(f"ComfyUI exited with {proc.returncode} while starting; log {log_path}:\n"
                              + _tail(handle.log_text()))
        try:
            if requests.get(handle.url + "/object_info", timeout=5).status_code == 200:
                return handle
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            handle.stop()
            raise ServerError(f"ComfyUI did not answer on {handle.url} within {timeout:.0f}s; log {log_path}:\n"
                              + _tail(handle.log_text()))
        time.sleep(0.5)


def start_test_server(full: bool = True, models_cache: str | Path | None = None) -> ServerHandle:
    """A throw-away ComfyUI for the test session: a temp base dir, the demo models generated into its
    model folders (or, when `models_cache` / $WEIGHTSMITH_E2E_MODELS names a folder, generated once there
    and listed after the temp folders, so reruns skip the ~2 GB write). `dispose()` removes it all."""
    from weightsmith.demo import make_demo_models

    base = Path(tempfile.mkdtemp(prefix="weightsmith-e2e-"))
    try:
        cache = models_cache or os.environ.get("WEIGHTSMITH_E2E_MODELS")
        models_root = Path(cache) if cache else base / "models"
        make_demo_models(models_root, full=full)
        handle = start_server(base, extra_model_roots=[models_root] if cache else [])
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    handle.owns_base = True
    return handle


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: `body` has `error` and `node_errors`."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"/prompt rejected ({status}): {json.dumps(body)[:2000]}")
        self.status = status
        self.body = body


@dataclass
class RunResult:
    """One prompt's end: its /history entry and the websocket messages seen for it."""

    prompt_id: str
    history: dict
    messages: list[dict]

    @property
    def status(self) -> str:
        return self.history.get("status", {}).get("status_str", "")

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def of_type(self, kind: str) -> list[dict]:
        return [m["data"] for m in self.messages if m.get("type") == kind]

    def progress(self, node: str | None = None) -> list[tuple[int, int]]:
        return [(m["value"], m["max"]) for m in self.of_type("progress") if node is None or m.get("node") == node]

    def error(self) -> dict | None:
        errs = self.of_type("execution_error")
        if errs:
            return errs[0]
        for kind, data in self.history.get("status", {}).get("messages", []):
            if kind == "execution_error":
                return data
        return None


class ComfyClient:
    """ComfyUI's HTTP + websocket API: queue prompts, follow them on the websocket, read /history."""

    def __init__(self, url: str, client_id: str | None = None):
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self._ws = None

    # -- HTTP
    def get(self, path: str, **kw) -> requests.Response:
        r = requests.get(self.url + path, timeout=kw.pop("timeout", 30), **kw)
        r.raise_for_status()
        return r

    def post(self, path: str, payload: dict | None = None, timeout: float = 30) -> requests.Response:
        return requests.post(self.url + path, json=payload if payload is not None else {}, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info").json()

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt id, or raises PromptRejected with ComfyUI's node errors."""
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        r = self.post("/prompt", payload)
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {"text": r.text}
        if r.status_code != 200:
            raise PromptRejected(r.status_code, body)
        if body.get("node_errors"):
            raise PromptRejected(r.status_code, body)
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").json().get(prompt_id)

    def wait_history(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Poll /history until the prompt has finished (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = self.history(prompt_id)
            if h and h.get("status", {}).get("completed") is not None and h["status"].get("status_str"):
                return h
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} not in /history after {timeout:.0f}s")

    def interrupt(self, prompt_id: str | None = None) -> None:
        r = self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})
        r.raise_for_status()

    def queue_state(self) -> dict:
        return self.get("/queue").json()

    # -- websocket
    def connect(self, retries: int = 5):
        import websocket  # websocket-client

        if self._ws is None:
            ws_url = self.url.replace("http://", "ws://").replace("https://", "wss://") + f"/ws?clientId={self.client_id}"
            for attempt in range(retries):
                try:
                    self._ws = websocket.create_connection(ws_url, timeout=10)
                    break
                except OSError:
                    if attempt == retries - 1:
                        raise
                    time.sleep(1)
        return self._ws

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def messages(self, timeout: float):
        """JSON websocket messages (binary preview frames skipped) until `timeout` seconds pass."""
        import websocket

        ws = self.connect()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no end of prompt on the websocket within {timeout:.0f}s")
            ws.settimeout(min(left, 5.0))
            try:
                raw = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(raw, str):
                yield json.loads(raw)

    def wait(self, prompt_ids: list[str], timeout: float = 120.0) -> dict[str, RunResult]:
        """Follow queued prompts on the websocket until each has ended, then read their /history."""
        pending = set(prompt_ids)
        seen: dict[str, list[dict]] = {p: [] for p in prompt_ids}
        deadline = time.monotonic() + timeout
        for msg in self.messages(timeout):
            data = msg.get("data") or {}
            pid = data.get("prompt_id")
            if pid in seen:
                seen[pid].append(msg)
                ended = (msg["type"] == "executing" and data.get("node") is None) or msg["type"] in (
                    "execution_error", "execution_interrupted")
                if ended:
                    pending.discard(pid)
            if not pending:
                break
        return {p: RunResult(p, self.wait_history(p, max(deadline - time.monotonic(), 10)), seen[p])
                for p in prompt_ids}

    def run(self, prompt: dict, timeout: float = 120.0) -> RunResult:
        """Queue one prompt and follow it to its end (connects the websocket first, so no message is missed)."""
        self.connect()
        pid = self.queue(prompt)
        return self.wait([pid], timeout)[pid]


def copy_log(handle: ServerHandle, dest_dir: str | Path) -> Path:
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / handle.log_path.name
    shutil.copyfile(handle.log_path, target)
    return target


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
