"""Malformed inputs that used to end in a Python traceback, a hang or a misleading message (issue 19,
items 6, 8 and 10), one test per class; tests/test_fuzz_cli.py fuzzes the same ground at random.

Each refusal must be exit 2 with one `error: ` line naming the file and saying what to do, with nothing
written; each input that is odd but legal must work.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from fuzz_cases import pack, parse
from fuzz_runner import run_in_process
from reliability_cases import assert_actionable, folder_state
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith import cli
from weightsmith.cli import main as cli_main
from weightsmith.lora.formats import save_lora
from weightsmith.lora.testloras import flux_block_linears, random_lora
from weightsmith.paths import create_temp_beside
from weightsmith.testmodels import FluxConfig, finetune, flux_shapes, flux_state_dict


@dataclass
class Files:
    dir: Path
    base: Path
    tuned: Path
    lora: Path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    d = tmp_path_factory.mktemp("malformed")
    base = flux_state_dict(FluxConfig(), "dev", seed=1)
    save_file({k: v.to(torch.bfloat16) for k, v in base.items()}, str(d / "base.safetensors"))
    tuned = finetune(base, seed=2, rank=4, scale=0.05)
    save_file({k: v.to(torch.bfloat16) for k, v in tuned.items()}, str(d / "tuned.safetensors"))
    lora = random_lora(flux_shapes(FluxConfig(), "dev"), "flux", rank=4, seed=5, targets=flux_block_linears)
    save_lora(lora, d / "lora.safetensors", fmt="comfy")
    return Files(d, d / "base.safetensors", d / "tuned.safetensors", d / "lora.safetensors")


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    c = capsys.readouterr()
    return rc, c.out, c.err


def assert_refused(rc: int, err: str, *names) -> None:
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err and "internal error" not in err, err
    assert_actionable(err, *names)


def lora_tensors(files: Files) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(files.lora), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


UP = "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight"
DOWN = "diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight"
ALPHA = "diffusion_model.double_blocks.0.img_attn.proj.alpha"

# command -> argv with the model (M) or LoRA (L) under test
MODEL_COMMANDS = {
    "merge": lambda f, bad, out: ["merge", f.base, bad, "-o", out / "m.safetensors"],
    "mix": lambda f, bad, out: ["mix", bad, f.base, f.tuned, "-o", out / "x.safetensors"],
    "extract": lambda f, bad, out: ["extract", f.base, bad, "-o", out / "e.safetensors"],
    "validate": lambda f, bad, out: ["validate", bad, f.tuned, f.lora],
    "inspect": lambda f, bad, out: ["inspect", bad],
    "verify": lambda f, bad, out: ["verify", f.lora, "--arch", "flux", "--model", bad],
}
LORA_COMMANDS = {
    "convert": lambda f, bad, out: ["convert", bad, "-o", out / "c.safetensors"],
    "inspect": lambda f, bad, out: ["inspect", bad],
    "verify": lambda f, bad, out: ["verify", bad, "--arch", "flux"],
    "compose": lambda f, bad, out: ["compose", f.lora, bad, "-o", out / "co.safetensors"],
    "rerank": lambda f, bad, out: ["rerank", bad, "--rank", "2", "-o", out / "r.safetensors"],
    "validate": lambda f, bad, out: ["validate", f.base, f.tuned, bad],
}


def _refused_everywhere(capsys, files: Files, tmp_path: Path, bad: Path, commands: dict, *names) -> None:
    for name, argv in commands.items():
        out = tmp_path / f"out_{name}"
        out.mkdir()
        before = folder_state(tmp_path, files.dir)
        rc, _, err = run(capsys, *argv(files, bad, out))
        assert_refused(rc, err, bad, *names)
        assert folder_state(tmp_path, files.dir) == before, f"{name} wrote something"


# ------------------------------------------------------------------------------------------ item 6


@pytest.mark.parametrize("where", ["whole", "entry", "metadata"])
def test_deeply_nested_header_json_is_refused_by_every_command(files, tmp_path, capsys, where):
    header, data = parse(files.base)
    deep = "[" * 100000 + "]" * 100000
    if where == "whole":
        raw = deep
    else:
        key = next(k for k in header if k != "__metadata__")
        header[key if where == "entry" else "__metadata__"] = "DEEP"
        raw = json.dumps(header).replace('"DEEP"', deep)
    bad = tmp_path / "deep.safetensors"
    bad.write_bytes(pack(raw, data))
    _refused_everywhere(capsys, files, tmp_path, bad, MODEL_COMMANDS)
    as_lora = tmp_path / "as_lora"
    as_lora.mkdir()
    _refused_everywhere(capsys, files, as_lora, bad, LORA_COMMANDS)


def _sharded(files: Files, folder: Path) -> dict[str, str]:
    folder.mkdir()
    with safe_open(str(files.base), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    keys = sorted(sd)
    wm = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / name))
        wm.update(dict.fromkeys(part, name))
    return wm


BAD_WEIGHT_MAPS = {
    "null": None, "list": ["model-00001-of-00002.safetensors"], "int": 1, "string": "x", "empty": {},
    "value_null": "V:null", "value_int": "V:1", "value_list": "V:[]", "value_dict": "V:{}", "value_string": "V:\"\"",
}


@pytest.mark.parametrize("given", ["index", "folder"])
@pytest.mark.parametrize("kind", sorted(BAD_WEIGHT_MAPS))
def test_shard_index_with_a_bad_weight_map_is_refused(files, tmp_path, capsys, kind, given):
    """Also item 8: an empty weight_map given by path used to merge as if the model were empty (exit 0)."""
    wm = _sharded(files, tmp_path / "sharded")
    value = BAD_WEIGHT_MAPS[kind]
    if isinstance(value, str) and value.startswith("V:"):
        wm[next(iter(wm))] = json.loads(value[2:])
        value = wm
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": value}))
    bad = index if given == "index" else tmp_path / "sharded"
    for argv in (["merge", files.base, bad, "-o", tmp_path / "m.safetensors"],
                 ["merge", bad, files.base, "-o", tmp_path / "m.safetensors"],
                 ["inspect", bad]):
        rc, _, err = run(capsys, *argv)
        assert_refused(rc, err, index)
        assert not (tmp_path / "m.safetensors").exists()


def test_shard_index_that_does_not_match_its_shards_is_refused(files, tmp_path, capsys):
    wm = _sharded(files, tmp_path / "sharded")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    wm["not.in.any.shard"] = wm[next(iter(wm))]
    index.write_text(json.dumps({"weight_map": wm}))
    rc, _, err = run(capsys, "merge", files.base, index, "-o", tmp_path / "m.safetensors")
    assert_refused(rc, err, index, "not.in.any.shard")


def _header_with(files: Files, key: str, **entry) -> tuple[dict, bytes]:
    header, data = parse(files.base)
    header[key].update(entry)
    return header, data


@pytest.mark.parametrize("shape", [[True, 64], [2**63, 0], [0, 2**64]])
def test_bool_or_huge_shapes_are_refused_by_inspect_and_verify(files, tmp_path, capsys, shape):
    header, data = parse(files.base)
    key = "img_in.weight"
    start = header[key]["data_offsets"][0]
    old = header[key]["data_offsets"][1] - start
    header[key]["shape"] = shape
    # a consistent layout: the tensor's bytes are what the (bogus) shape needs, 64x2 bytes for [True, 64]
    need = 64 * 2 if shape[0] is True else 0
    data = data[:start] + data[start : start + need] + data[start + old :]
    for k, e in header.items():
        if k != "__metadata__" and e["data_offsets"][0] > start:
            e["data_offsets"] = [o - old + need for o in e["data_offsets"]]
    header[key]["data_offsets"] = [start, start + need]
    bad = tmp_path / "shape.safetensors"
    bad.write_bytes(pack(header, data))
    for argv in (["inspect", bad], ["verify", files.lora, "--arch", "flux", "--model", bad],
                 ["merge", files.base, bad, "-o", tmp_path / "m.safetensors"]):
        rc, _, err = run(capsys, *argv)
        assert_refused(rc, err, bad, key)
        assert "invalid shape" in err


def _lora_case(files: Files, tmp_path: Path, case: str) -> Path:
    sd, meta = lora_tensors(files)
    up, down = sd[UP], sd[DOWN]
    if case == "rank0":
        sd[UP], sd[DOWN] = up[:, :0].contiguous(), down[:0].contiguous()
    elif case == "int_factors":
        sd[UP] = (up * 100).to(torch.int8)
    elif case == "bool_factors":
        sd[UP], sd[DOWN] = up > 0, down > 0
    elif case == "diff_wrong_shape":
        sd[UP.replace(".lora_up.weight", ".diff")] = torch.ones(up.shape[0], down.shape[1] + 1)
    elif case == "bias_diff_2d":
        sd[UP.replace(".lora_up.weight", ".diff_b")] = torch.ones(up.shape[0], 2)
    elif case == "empty_diff":
        sd[UP.replace(".lora_up.weight", ".diff")] = torch.zeros(0)
    elif case == "alpha_array":
        sd[ALPHA] = torch.tensor([1.0, 2.0])
    elif case == "reshape_hint_not_json":
        meta["weightsmith.reshape"] = "not json"
    elif case == "reshape_weight_float":
        sd[UP.replace(".lora_up.weight", ".reshape_weight")] = torch.tensor([1.5, 2.5])
    path = tmp_path / f"{case}.safetensors"
    save_file(sd, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("case", ["rank0", "int_factors", "bool_factors", "diff_wrong_shape", "bias_diff_2d",
                                  "empty_diff", "alpha_array", "reshape_hint_not_json", "reshape_weight_float"])
def test_malformed_lora_is_refused_by_every_command(files, tmp_path, capsys, case):
    bad = _lora_case(files, tmp_path, case)
    _refused_everywhere(capsys, files, tmp_path, bad, LORA_COMMANDS)


@pytest.mark.parametrize("case", ["loha_wrong_shape", "lokr_int_factor", "lokr_empty_factor"])
def test_malformed_lokr_and_loha_are_refused(files, tmp_path, capsys, case):
    """Adapter factors are checked when read: dtype, size, and that they multiply (on the meta device: shapes
    only, no math), instead of failing deep in compose/rerank."""
    from fuzz_cases import _adapter_lora

    path = _adapter_lora(_kohya(files, tmp_path), tmp_path / "adapters.safetensors")
    with safe_open(str(path), "pt") as f:
        sd, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    loha, lokr = "lora_unet_double_blocks_0_img_mlp_0", "lora_unet_double_blocks_0_img_attn_proj"
    if case == "loha_wrong_shape":
        sd[f"{loha}.hada_w2_a"] = torch.ones(2, 3, 4)
    elif case == "lokr_int_factor":
        sd[f"{lokr}.lokr_w1"] = torch.ones(8, 8, dtype=torch.int32)
    else:
        sd[f"{lokr}.lokr_w2"] = torch.zeros(0, 8)
    bad = tmp_path / f"{case}.safetensors"
    save_file(sd, str(bad), metadata=meta)
    _refused_everywhere(capsys, files, tmp_path, bad, LORA_COMMANDS)


def test_lora_with_lokr_and_loha_modules_validates(files, tmp_path, capsys):
    """A valid LoRA holding LoKr/LoHa modules used to be refused by validate ("rank must be ≥ 1 (got 0)")."""
    from fuzz_cases import _adapter_lora

    path = _adapter_lora(_kohya(files, tmp_path), tmp_path / "adapters.safetensors")
    rc, out, err = run(capsys, "validate", files.base, files.tuned, path, "--report", tmp_path / "v.json", "--modules")
    assert rc == 0, err
    rows = {m["key"]: m for m in json.loads((tmp_path / "v.json").read_text())["modules"]}
    assert rows["double_blocks.0.img_attn.proj.weight"]["status"] == "adapter"
    assert rows["double_blocks.0.img_mlp.0.weight"]["status"] == "adapter"


def _kohya(files: Files, tmp_path: Path) -> Path:
    from weightsmith.lora.formats import load_lora

    path = tmp_path / "kohya.safetensors"
    save_lora(load_lora(files.lora), path, fmt="kohya")
    return path


def test_fp8_factors_and_all_zero_rows_are_handled(files, tmp_path, capsys):
    """Odd but legal LoRAs work: fp8 factors (stacked as bf16, which holds them exactly), rows of zeros."""
    sd, meta = lora_tensors(files)
    fp8 = {k: v.to(torch.float8_e4m3fn) if "lora_" in k else v for k, v in sd.items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"), metadata=meta)
    zero = dict(sd)
    zero[UP] = zero[UP].clone()
    zero[UP][:8] = 0
    save_file(zero, str(tmp_path / "zero_rows.safetensors"), metadata=meta)
    for name in ("fp8", "zero_rows"):
        lora = tmp_path / f"{name}.safetensors"
        for i, argv in enumerate((["compose", files.lora, f"{lora}:0.5", "-o"], ["compose", lora, "--rank", "2", "-o"],
                                  ["rerank", lora, "--rank", "2", "-o"], ["convert", lora, "--to", "kohya", "-o"])):
            out = tmp_path / f"{name}_{i}.safetensors"
            rc, _, err = run(capsys, *argv, out)
            assert rc == 0, err
            with safe_open(str(out), "pt") as f:
                assert all(bool(f.get_tensor(k).float().isfinite().all()) for k in f.keys())
        rc, _, err = run(capsys, "validate", files.base, files.tuned, lora)
        assert rc == 0, err


def test_zero_element_tensors_are_handled(files, tmp_path, capsys):
    with safe_open(str(files.base), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd["extra.empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    odd = tmp_path / "empty_tensor.safetensors"
    save_file(sd, str(odd))
    for name, argv in MODEL_COMMANDS.items():
        out = tmp_path / f"out_{name}"
        out.mkdir()
        rc, _, err = run(capsys, *argv(files, odd, out))
        assert rc in (0, 1, 2) and "Traceback" not in err and "internal error" not in err, err
        if rc == 2:
            assert_actionable(err, odd)


def _fifo(tmp_path: Path, name: str) -> Path:
    p = tmp_path / name
    os.mkfifo(p)
    return p


@pytest.mark.parametrize("kind", ["fifo", "fifo_ckpt", "fifo_no_suffix", "socket", "symlink_to_fifo", "dev_null"])
def test_non_regular_files_are_refused_at_once(files, tmp_path, kind):
    """A FIFO used to block the first read forever; every command refuses such inputs before opening them."""
    if kind == "fifo":
        bad = _fifo(tmp_path, "m.safetensors")
    elif kind == "fifo_ckpt":
        bad = _fifo(tmp_path, "m.ckpt")
    elif kind == "fifo_no_suffix":
        bad = _fifo(tmp_path, "model")
    elif kind == "socket":
        bad = tmp_path / "m.safetensors"
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(bad))
        s.close()
    elif kind == "symlink_to_fifo":
        bad = tmp_path / "link.safetensors"
        bad.symlink_to(_fifo(tmp_path, "target.safetensors"))
    else:
        bad = Path("/dev/null")
    for argv in [m(files, bad, tmp_path) for m in MODEL_COMMANDS.values()] + \
                [m(files, bad, tmp_path) for m in LORA_COMMANDS.values()]:
        rc, _, err, escaped = run_in_process([str(a) for a in argv], timeout=30)
        assert rc == 2 and not escaped, (argv, rc, err, escaped)
        assert_actionable(err, bad)
        assert "not a regular file" in err


def test_index_naming_a_fifo_shard_is_refused(files, tmp_path, capsys):
    wm = _sharded(files, tmp_path / "sharded")
    os.mkfifo(tmp_path / "sharded" / "fifo.safetensors")
    wm[next(iter(wm))] = "fifo.safetensors"
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": wm}))
    rc, _, err, escaped = run_in_process(["merge", str(files.base), str(index), "-o", str(tmp_path / "o.safetensors")], 30)
    assert rc == 2 and not escaped and "fifo.safetensors" in err and "not a regular file" in err


# ------------------------------------------------------------------------------------------ item 8


def _layout_case(files: Files, case: str) -> bytes:
    header, data = parse(files.base)
    keys = sorted(k for k in header if k != "__metadata__")
    if case == "overlap":
        a, b = keys[0], keys[1]
        header[b] = dict(header[a])
    elif case == "gap":
        end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
        last = next(k for k in keys if header[k]["data_offsets"][1] == end)
        o = header[last]["data_offsets"]
        header[last]["data_offsets"] = [o[0] + 8, o[1] + 8]
        data = data[: o[0]] + b"\0" * 8 + data[o[0] :]
    elif case == "metadata_list":
        header["__metadata__"] = []
    elif case == "metadata_string":
        header["__metadata__"] = "x"
    elif case == "trailing_bytes":
        data = data + b"\0" * 16
    return pack(header, data)


@pytest.mark.parametrize("case", ["overlap", "gap", "metadata_list", "metadata_string", "trailing_bytes"])
def test_inspect_and_verify_judge_a_header_like_every_reading_command(files, tmp_path, capsys, case):
    """inspect and verify --model used to describe these as valid models while every command that reads
    tensors refused them: one validation (read_header) now serves all, with the same message."""
    bad = tmp_path / f"{case}.safetensors"
    bad.write_bytes(_layout_case(files, case))
    messages = set()
    for argv in (["inspect", bad], ["verify", files.lora, "--arch", "flux", "--model", bad],
                 ["merge", files.base, bad, "-o", tmp_path / "m.safetensors"],
                 ["extract", files.base, bad, "-o", tmp_path / "e.safetensors"]):
        rc, _, err = run(capsys, *argv)
        assert_refused(rc, err, bad)
        messages.add(err.strip())
    assert len(messages) == 1, messages


def test_fp8_model_with_nan_is_reported_by_extract_and_validate(files, tmp_path, capsys):
    """isfinite has no fp8 kernel: the NaN check used to crash; now the layer is reported and left out."""
    with safe_open(str(files.tuned), "pt") as f:
        sd = {k: f.get_tensor(k).float().to(torch.float8_e4m3fn) for k in f.keys()}
    key = "double_blocks.0.img_attn.proj.weight"
    sd[key].view(torch.uint8).view(-1)[0] = 0x7F  # NaN in e4m3fn
    tuned = tmp_path / "fp8_nan.safetensors"
    save_file(sd, str(tuned))
    rc, out, err = run(capsys, "extract", files.base, tuned, "-o", tmp_path / "e.safetensors", "--rank", "2")
    assert rc == 0, err
    assert "NaN or Inf" in out and key in out
    rc, out, err = run(capsys, "validate", files.base, tuned, files.lora)
    assert rc == 0, err
    assert "NaN or Inf" in out and key in out


# ------------------------------------------------------------------------------------------ item 10


def test_file_kind_is_sniffed_not_taken_from_the_suffix(files, tmp_path, capsys):
    rand = tmp_path / "random.ckpt"
    rand.write_bytes(bytes(range(7, 250)) * 10)
    rc, _, err = run(capsys, "merge", files.base, rand, "-o", tmp_path / "m.safetensors")
    assert_refused(rc, err, rand)
    assert "pickle" in err and "would run" not in err and "neither safetensors nor a torch checkpoint" in err
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"\x80\x02" + bytes(range(200, 256)) * 4)
    rc, _, err = run(capsys, "merge", files.base, damaged, "-o", tmp_path / "m.safetensors")
    assert_refused(rc, err, damaged)
    assert "damaged" in err and "would run" not in err
    # a safetensors file under a torch suffix is read as what it is (never unpickled)
    for suffix in (".bin", ".ckpt"):
        renamed = tmp_path / f"tuned{suffix}"
        renamed.write_bytes(files.tuned.read_bytes())
        out, ref = tmp_path / f"m{suffix}.safetensors", tmp_path / f"ref{suffix}.safetensors"
        assert run(capsys, "merge", files.base, renamed, "-o", out)[0] == 0
        assert run(capsys, "merge", files.base, files.tuned, "-o", ref)[0] == 0
        with safe_open(str(out), "pt") as a, safe_open(str(ref), "pt") as b:
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in b.keys())


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_refused_pickles_say_why(files, tmp_path, capsys):
    """The safe loader's refusals are told apart by parsing the pickle (never running it): code it would
    call (named), a tensor-only file saved with pickle protocol 4, a truncated legacy file."""
    cases = {}
    torch.save({"w": torch.ones(2)}, tmp_path / "protocol4.pt", pickle_protocol=4)
    cases["protocol4.pt"] = ("holds only tensors", "would run")
    torch.save({"w": _Payload()}, tmp_path / "payload4.pt", pickle_protocol=4)
    cases["payload4.pt"] = ("it calls posix.system", None)
    with open(tmp_path / "payload.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"w": _Payload()}}, f)
    cases["payload.ckpt"] = ("it calls posix.system", None)
    torch.save({"w": torch.ones(2)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    raw = (tmp_path / "legacy.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])  # cut inside a global's name
    cases["truncated.pt"] = ("damaged", "would run")
    (tmp_path / "truncated_early.pt").write_bytes(raw[: len(raw) // 3])
    cases["truncated_early.pt"] = ("EOFError", "would run")
    for name, (said, unsaid) in cases.items():
        rc, _, err = run(capsys, "merge", files.base, tmp_path / name, "-o", tmp_path / "m.safetensors")
        assert_refused(rc, err, tmp_path / name)
        assert said in err and (unsaid is None or unsaid not in err), err
        assert "\x1b[" not in err  # torch's message carries terminal colour codes: never passed on


def test_nan_alpha_is_named_as_such(files, tmp_path, capsys):
    sd, meta = lora_tensors(files)
    sd[ALPHA] = torch.tensor(float("nan"))
    bad = tmp_path / "nan_alpha.safetensors"
    save_file(sd, str(bad), metadata=meta)
    rc, _, err = run(capsys, "compose", files.lora, f"{bad}:0.5", "-o", tmp_path / "c.safetensors")
    assert_refused(rc, err, bad, ALPHA)
    assert "nan" in err and "alpha" in err and "overflow" not in err


def test_long_output_names(files, tmp_path, capsys):
    """A 250-byte name (legal on ext4) works: the temp name is cut to fit; a 300-byte one is refused."""
    name250 = "m" * (250 - len(".safetensors")) + ".safetensors"
    for argv in (["merge", files.base, files.tuned], ["extract", files.base, files.tuned, "--rank", "2"],
                 ["compose", files.lora]):
        out = tmp_path / argv[0] / name250
        out.parent.mkdir()
        rc, _, err = run(capsys, *argv, "-o", out)
        assert rc == 0, err
        assert sorted(p.name for p in out.parent.iterdir()) == [name250]
    for argv in (["merge", files.base, files.tuned, "-o"], ["extract", files.base, files.tuned, "-o"],
                 ["compose", files.lora, "-o"], ["merge", files.base, files.tuned, "-o", tmp_path / "x.safetensors",
                                                  "--report"]):
        before = folder_state(tmp_path)
        rc, _, err = run(capsys, *argv, tmp_path / ("r" * 288 + ".safetensors"))
        assert_refused(rc, err)
        assert "shorten it" in err and "300 bytes" in err
        assert folder_state(tmp_path) == before


def test_temp_names_stay_hidden_unique_and_within_name_max(tmp_path):
    name = "é" * 120 + ".safetensors"  # 252 bytes
    made = set()
    for _ in range(5):
        fd, tmp = create_temp_beside(tmp_path, name)
        os.close(fd)
        assert tmp.name.startswith(".") and tmp.name.endswith(".tmp") and len(os.fsencode(tmp.name)) <= 255
        assert f".{os.getpid()}-" in tmp.name  # the pid survives the cut: stale-temp cleanup needs it
        made.add(tmp.name)
    assert len(made) == 5


@pytest.mark.skipif(os.name == "nt", reason="processes are never probed on Windows: every temp is kept")
def test_cut_temp_name_of_a_killed_run_is_still_removed_as_stale(tmp_path):
    """A long output name's temp file is cut to fit NAME_MAX; the next run must still attribute it to
    the output (its cut NAME is a prefix) and remove it when its process is gone."""
    import subprocess
    import sys

    name = "é" * 120 + ".safetensors"  # 252 bytes
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    fd, mine = create_temp_beside(tmp_path, name)
    os.close(fd)
    cut, token = mine.name.split(f".{os.getpid()}-")
    while len(os.fsencode(f"{cut}.{gone.pid}-{token}")) > 255:  # the dead pid may have more digits than ours
        cut = cut[:-1]  # still a prefix of the output name, as a cut temp name of that run would be
    stale = tmp_path / f"{cut}.{gone.pid}-{token}"
    mine.rename(stale)
    fd, fresh = create_temp_beside(tmp_path, name)
    os.close(fd)
    assert not stale.exists() and fresh.exists()


def test_internal_error_is_one_line_and_debug_shows_the_traceback(files, capsys, monkeypatch):
    """A bug (not a bad input) is reported in one line with the way to see the traceback; --debug or
    WEIGHTSMITH_DEBUG=1 let it through."""
    real_build = cli.build_parser

    def crash(args):
        raise ZeroDivisionError("planted")

    def build():
        parser = real_build()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                action.choices["inspect"].set_defaults(func=crash)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    monkeypatch.delenv("WEIGHTSMITH_DEBUG", raising=False)
    rc, _, err = run(capsys, "inspect", files.lora)
    assert rc == 1 and err.count("\n") == 1
    assert "internal error" in err and "ZeroDivisionError: planted" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        cli_main(["--debug", "inspect", str(files.lora)])
    monkeypatch.setenv("WEIGHTSMITH_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli_main(["inspect", str(files.lora)])


def test_header_sizes_fit_the_format(files, tmp_path, capsys):
    """A header length of 2^64 - 1 and one that cuts the JSON short are corrupt headers, not crashes."""
    raw = files.base.read_bytes()
    for n in (2**64 - 1, 0, 5):
        bad = tmp_path / f"len{n}.safetensors"
        bad.write_bytes(struct.pack("<Q", n) + raw[8:])
        rc, _, err = run(capsys, "inspect", bad)
        assert_refused(rc, err, bad)
