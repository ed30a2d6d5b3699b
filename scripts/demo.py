"""`make demo`: generate the demo models, start the real ComfyUI with the pack, run a shipped workflow
through the HTTP API, print what it produced, and leave the UI up (Ctrl-C stops it).

    .venv/bin/python scripts/demo.py [--workflow NAME | --all] [--port 8188] [--no-wait] [--small]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from server_support import ComfyClient, ServerError, free_port, start_server  # noqa: E402

from weightsmith.demo import make_demo_models  # noqa: E402

DEFAULT_WORKFLOW = "merge_flux_guidance_preset"


def _port(wanted: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
            return wanted
        except OSError:
            return free_port()


def _summarise(name: str, result, output_root: Path) -> None:
    print(f"\n== {name}: {result.status}")
    if result.status != "success":
        err = result.error() or {}
        print(f"   error in node {err.get('node_type')}: {err.get('exception_message', '').strip()}")
        return
    for node_id, ui in result.outputs.items():
        for text in ui.get("weightsmith_report", [])[:1]:
            lines = text.strip().splitlines()
            print(f"   node {node_id} report:")
            for line in lines[:14]:
                print(f"     {line}")
            if len(lines) > 14:
                print(f"     … ({len(lines) - 14} more lines)")
        for key in ("images", "weightsmith_files"):
            for item in ui.get(key, []):
                if isinstance(item, dict):
                    print(f"   wrote {output_root / item.get('subfolder', '') / item.get('filename', '')}")
                else:
                    print(f"   wrote {item}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", default=DEFAULT_WORKFLOW, help="name of a workflow in workflows/api/")
    ap.add_argument("--all", action="store_true", help="run every shipped API workflow")
    ap.add_argument("--port", type=int, default=8188)
    ap.add_argument("--listen", default="127.0.0.1", help="address to serve on (127.0.0.1 keeps it private)")
    ap.add_argument("--no-wait", action="store_true", help="stop the server after the run instead of keeping the UI up")
    ap.add_argument("--small", action="store_true", help="skip the 3072-wide Flux pair (about 2 GB)")
    args = ap.parse_args(argv)

    base = ROOT / ".demo"
    models = base / "models"
    print(f"[demo] generating demo models under {models} (kept between runs)", flush=True)
    t0 = time.monotonic()
    made = make_demo_models(models, full=not args.small)
    print(f"[demo] {len(made)} demo files ready in {time.monotonic() - t0:.1f}s")

    api_dir = ROOT / "workflows" / "api"
    names = sorted(p.stem for p in api_dir.glob("*.json")) if args.all else [args.workflow]
    for n in names:
        if not (api_dir / f"{n}.json").is_file():
            print(f"[demo] no workflow {n!r} in {api_dir}; have: {', '.join(sorted(p.stem for p in api_dir.glob('*.json')))}")
            return 2

    port = _port(args.port)
    print(f"[demo] starting ComfyUI with the pack on http://{args.listen}:{port} (log: {base / 'comfyui.log'})", flush=True)
    try:
        server = start_server(base, port=port, log_path=base / "comfyui.log", listen=args.listen)
    except ServerError as e:
        print(f"[demo] {e}")
        return 1
    try:
        client = ComfyClient(server.url)
        failed = 0
        for n in names:
            prompt = json.loads((api_dir / f"{n}.json").read_text())
            print(f"[demo] queueing workflows/api/{n}.json", flush=True)
            result = client.run(prompt, timeout=900)
            _summarise(n, result, server.output_dir)
            failed += result.status != "success"
        print(f"\n[demo] outputs: {server.output_dir} and {server.models_dir('loras')}, {server.models_dir('diffusion_models')}")
        problems = server.log_problems()
        if problems:
            print("[demo] the server log shows problems:\n  " + "\n  ".join(problems[:10]))
        if args.no_wait:
            return 1 if failed else 0
        print(f"[demo] the UI is up at {server.url} — open it, then Workflow > Browse Templates > weightsmith. Ctrl-C stops it.")
        while server.alive():
            time.sleep(1)
        return 1 if failed else 0
    except KeyboardInterrupt:
        print("\n[demo] stopping")
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
