"""Streaming weight I/O: validating reader, atomic streaming writer, sources, prefixes, safe pickles."""

from __future__ import annotations

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith.errors import BadFileError, OutputPathError, UnsafePickleError
from weightsmith.safetensors_io import StreamingWriter, read_header, write_safetensors
from weightsmith.sources import DictSource, classify_keys, diffusion_view, open_model

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.int64, torch.uint8, torch.bool]


def _tensor(dtype, shape=(3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 100, shape, generator=g).to(dtype)
    return torch.randn(shape, generator=g).to(dtype)


def test_roundtrip_every_dtype_with_metadata(tmp_path):
    tensors = {f"t.{i}": _tensor(d, (3, 4 + i), i) for i, d in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    out = write_safetensors(tmp_path / "m.safetensors", tensors, {"who": "weightsmith", "n": "3"})
    with safe_open(str(out), "pt") as f:  # the reference reader accepts our bytes
        assert f.metadata() == {"who": "weightsmith", "n": "3"}
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    src = open_model(out)
    assert set(src.keys()) == set(tensors) and src.metadata["who"] == "weightsmith"


def test_writer_accepts_any_order_and_checks_plan(tmp_path):
    plan = {"a": ((2, 2), torch.float32), "b": ((3,), torch.bfloat16)}
    with StreamingWriter(tmp_path / "o.safetensors", plan) as w:
        w.write("b", torch.ones(3, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="planned"):
            w.write("a", torch.ones(2, 3))
        w.write("a", torch.eye(2))
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.eye(2))


def test_writer_parts_from_threads_fill_a_tensor_exactly_once(tmp_path):
    """Row blocks written by several threads with write_at land where planned; overlap, out-of-range
    parts, a whole write after parts, and an unfilled key are errors."""
    from concurrent.futures import ThreadPoolExecutor

    x = torch.arange(64 * 8, dtype=torch.float32).view(64, 8)
    plan = {"x": ((64, 8), torch.float32), "e": ((0,), torch.float32)}
    with StreamingWriter(tmp_path / "o.safetensors", plan) as w:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda r: w.write_at("x", r * 8 * 4, x[r:r + 4]), range(60, -1, -4)))
        with pytest.raises(KeyError, match="twice"):
            w.write_at("x", 0, x[:1])
        with pytest.raises(KeyError, match="twice"):
            w.write("x", x)
        with pytest.raises(ValueError, match="outside"):
            w.write_at("e", 0, x[:1])
        w.write_at("e", 0, torch.empty(0))
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("x"), x) and f.get_tensor("e").numel() == 0
    with pytest.raises(RuntimeError, match="never written"):
        with StreamingWriter(tmp_path / "p.safetensors", {"x": ((64, 8), torch.float32)}) as w:
            w.write_at("x", 0, x[:63])  # one row short
    assert not (tmp_path / "p.safetensors").exists()


def _no_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_exception_midway_leaves_nothing(tmp_path):
    plan = {"a": ((2,), torch.float32), "b": ((2,), torch.float32)}
    with pytest.raises(RuntimeError, match="boom"):
        with StreamingWriter(tmp_path / "o.safetensors", plan) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert _no_leftovers(tmp_path) == []


def test_unwritten_planned_tensor_is_an_error_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="never written"):
        with StreamingWriter(tmp_path / "o.safetensors", {"a": ((2,), torch.float32)}):
            pass
    assert _no_leftovers(tmp_path) == []


def test_never_overwrites_existing_output_or_an_input(tmp_path):
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(OutputPathError, match="overwrite"):
        write_safetensors(existing, {"a": torch.ones(1)})
    assert existing.read_bytes() == b"keep me"
    src = tmp_path / "in.safetensors"
    save_file({"a": torch.ones(1)}, str(src))
    with pytest.raises(OutputPathError, match="one of the inputs"):
        write_safetensors(src, {"a": torch.ones(1)}, protect=[src], overwrite=True)
    with safe_open(str(src), "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.ones(1))


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from weightsmith.safetensors_io import StreamingWriter
    out = sys.argv[1]
    plan = {f"t{i}": ((256, 1024), torch.float32) for i in range(400)}
    with StreamingWriter(out, plan) as w:
        for i in range(400):
            w.write(f"t{i}", torch.ones(256, 1024))
            if i == 5:
                print("writing", flush=True)
                time.sleep(30)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_killed_or_interrupted_write_leaves_no_output(tmp_path, sig):
    out = tmp_path / "big.safetensors"
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(sig)
    p.wait(timeout=30)
    assert not out.exists()
    if sig == signal.SIGINT:  # an interrupt (KeyboardInterrupt) also cleans its temp file
        assert _no_leftovers(tmp_path) == []


def test_full_disk_gives_clear_error_and_no_partial_file(tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: the write fails with EFBIG."""
    script = textwrap.dedent(
        """
        import resource, signal, sys, torch
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        from weightsmith.safetensors_io import StreamingWriter
        from weightsmith.errors import OutputPathError
        plan = {f"t{i}": ((256, 256), torch.float32) for i in range(8)}
        try:
            with StreamingWriter(sys.argv[1], plan) as w:
                for i in range(8):
                    w.write(f"t{i}", torch.ones(256, 256))
        except OutputPathError as e:
            print("ERR", e)
        """
    )
    out = tmp_path / "o.safetensors"
    r = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=60)
    assert "ERR could not write" in r.stdout and "o.safetensors" in r.stdout, r.stdout + r.stderr
    assert _no_leftovers(tmp_path) == []


# ---------------------------------------------------------------- hostile and broken files


def _raw_safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


BROKEN = {
    "zero_length": b"",
    "truncated_length": b"\x10\x00\x00",
    "header_past_end": _raw_safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, length=10**6),
    "corrupt_json": _raw_safetensors(b'{"a": {"dtype": "F32", "shape": [1], "data_offs'),
    "data_past_end": _raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "duplicate_keys": _raw_safetensors(
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        b"\0" * 4,
    ),
    "unsupported_dtype": _raw_safetensors({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    "huge_shape": _raw_safetensors({"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4]}}, b"\0" * 4),
    "not_an_object": _raw_safetensors(b"[1, 2, 3]"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_safetensors_refused_with_named_file(tmp_path, case):
    p = tmp_path / f"{case}.safetensors"
    p.write_bytes(BROKEN[case])
    with pytest.raises(BadFileError) as e:
        open_model(p)
    assert str(p) in str(e.value)


def test_directory_where_a_file_is_expected(tmp_path):
    d = tmp_path / "model.safetensors"
    d.mkdir()
    with pytest.raises(BadFileError, match="is a directory"):
        read_header(d)
    with pytest.raises(BadFileError, match="no .safetensors"):
        open_model(d)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    with open(ckpt, "wb") as f:
        pickle.dump({"state_dict": {"w": _Payload(str(marker))}}, f)
    torch_style = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _Payload(str(marker))}, torch_style)
    for path in (ckpt, torch_style):
        with pytest.raises(UnsafePickleError, match="refused") as e:
            open_model(path)
        assert str(path) in str(e.value)
    assert not marker.exists()


def test_plain_tensor_checkpoint_loads(tmp_path):
    sd = {"model.diffusion_model.a.weight": torch.randn(3, 3), "first_stage_model.b": torch.randn(2)}
    p = tmp_path / "ok.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, p)
    src = open_model(p)
    assert set(src.keys()) == set(sd)
    assert torch.equal(src.get("model.diffusion_model.a.weight"), sd["model.diffusion_model.a.weight"])
    view = diffusion_view(src)
    assert view.keys() == ["a.weight"]


# ---------------------------------------------------------------- sources, shards, prefixes


def test_sharded_folder_and_index_match_single_file(tmp_path):
    sd = {f"blocks.{i}.weight": torch.randn(4, 4) for i in range(5)}
    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({k: sd[k] for k in list(sd)[:2]}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in list(sd)[2:]}, str(shards / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, k in enumerate(sd)}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    for src in (open_model(shards), open_model(shards / "model.safetensors.index.json")):
        assert sorted(src.keys()) == sorted(sd)
        for k in sd:
            assert torch.equal(src.get(k), sd[k])


def test_index_with_missing_or_escaping_shard(tmp_path):
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    with pytest.raises(BadFileError, match="outside"):
        open_model(tmp_path / "m.safetensors.index.json")
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(BadFileError, match="missing"):
        open_model(tmp_path)


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", "", "transformer."])
def test_prefix_views_line_up(prefix):
    src = DictSource({prefix + "img_in.weight": torch.ones(2, 2), prefix + "txt_in.weight": torch.zeros(2, 2)})
    view = diffusion_view(src)
    assert sorted(view.keys()) == ["img_in.weight", "txt_in.weight"]
    assert torch.equal(view.get("img_in.weight"), torch.ones(2, 2))


def test_key_groups_of_full_checkpoint_and_bare_file():
    full = ["model.diffusion_model.out.2.weight", "cond_stage_model.transformer.x", "first_stage_model.decoder.y", "alphas_cumprod"]
    assert classify_keys(full) == {
        "model.diffusion_model.out.2.weight": "unet",
        "cond_stage_model.transformer.x": "te",
        "first_stage_model.decoder.y": "vae",
        "alphas_cumprod": "other",
    }
    assert set(classify_keys(["input_blocks.0.0.weight", "out.2.weight"]).values()) == {"unet"}


def test_nan_and_inf_reported_or_refused(tmp_path):
    p = tmp_path / "nan.safetensors"
    save_file({"ok": torch.ones(3), "bad": torch.tensor([1.0, float("nan")]), "inf": torch.tensor([float("inf")]).half()}, str(p))
    src = open_model(p)
    for k in src.keys():
        src.get(k)
    assert sorted(src.nonfinite_keys) == ["bad", "inf"]
    strict = open_model(p, nonfinite="error")
    assert torch.equal(strict.get("ok"), torch.ones(3))
    with pytest.raises(BadFileError, match="'bad' contains NaN or Inf") as e:
        strict.get("bad")
    assert str(p) in str(e.value)
    prefixed = tmp_path / "prefixed.safetensors"
    save_file({"model.diffusion_model.w": torch.tensor([float("nan")])}, str(prefixed))
    with pytest.raises(BadFileError):
        diffusion_view(open_model(prefixed, nonfinite="error")).get("w")
    base = open_model(prefixed)
    diffusion_view(base).get("w")
    assert base.nonfinite_keys == ["w"]  # named as the reader saw it


@pytest.mark.parametrize(
    "argv",
    [
        ["merge", "{nan}", "{ok}", "-o", "{out}"],
        ["mix", "{ok}", "{nan}", "{ok2}", "-o", "{out}"],
        ["extract", "{ok}", "{nan}", "-o", "{out}"],
    ],
    ids=["merge", "mix", "extract"],
)
def test_cli_nonfinite_error_refuses_nan_inputs(tmp_path, argv):
    """`weightsmith --nonfinite error …`: an input holding NaN is refused naming file and key; nothing written."""
    from weightsmith.testmodels import FluxConfig, flux_state_dict

    sd = flux_state_dict(FluxConfig(), "dev", seed=1)
    save_file(sd, str(tmp_path / "ok.safetensors"))
    save_file({k: v + 0.01 for k, v in sd.items()}, str(tmp_path / "ok2.safetensors"))
    bad = dict(sd)
    bad["img_in.weight"] = bad["img_in.weight"].clone()
    bad["img_in.weight"][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    paths = {"nan": tmp_path / "nan.safetensors", "ok": tmp_path / "ok.safetensors",
             "ok2": tmp_path / "ok2.safetensors", "out": tmp_path / "out.safetensors"}
    args = [a.format(**paths) for a in argv]
    r = subprocess.run([sys.executable, "-m", "weightsmith", "--nonfinite", "error", *args], capture_output=True, text=True)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "nan.safetensors" in r.stderr and "img_in.weight" in r.stderr and "NaN" in r.stderr
    assert not paths["out"].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors", "ok.safetensors", "ok2.safetensors"]
