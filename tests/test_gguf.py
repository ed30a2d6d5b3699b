"""GGUF in and out (ComfyUI-GGUF layout).

In: files made by the `gguf` package itself (gguf_support.write_reference_gguf, ComfyUI-GGUF's convert
steps) read back bit for bit equal to `gguf.quants.dequantize`, and merge / extract exactly like their
dequantized twins; every torch kernel (K-quants, IQ4) matches the package's decoder on random raw blocks.
Out: `--dtype gguf-…` files read by the package's own reader hold the intended weights within the type's
rounding (bit for bit what the package's quantizer makes of the fp32 merge), in the layout ComfyUI-GGUF's
loader expects (checked with its code when a copy is available). Damaged files are refused, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf_support import (
    T,
    comfyui_gguf_dir,
    gguf,
    import_comfyui_gguf,
    random_blocks,
    reference_values,
    write_reference_gguf,
)
from safetensors.torch import load_file, save_file

from weightsmith.cli import main
from weightsmith.encodings import gguf_quants
from weightsmith.encodings.gguf import GGUFSource
from weightsmith.encodings.gguf_write import GGUFStreamWriter, gguf_output_type, write_gguf
from weightsmith.errors import BadFileError, OutputPathError, WeightsmithError
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import lora_state_dict
from weightsmith.merge import merge
from weightsmith.sdunet import sd_unet_state_dict
from weightsmith.sources import open_model
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

LEGACY = ("Q8_0", "Q4_0", "Q5_1")  # the types the issue names; the package quantizes them
IMG_ARCH_LIST = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2",
                 "qwen_image"}  # ComfyUI-GGUF loader.py


def bits(x) -> np.ndarray:
    a = x.float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.fixture(scope="module")
def flux_pair():
    base = flux_state_dict(FluxConfig(), "dev", seed=0)
    return base, finetune(base, seed=1, rank=4, scale=0.1, noise=0.01)


def twin_of(gguf_path: Path, out: Path) -> Path:
    """The dequantized twin: the package's decoded values stored as fp32 safetensors."""
    save_file({k: torch.from_numpy(v) for k, v in reference_values(gguf_path).items()}, str(out))
    return out


# --- reading ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", LEGACY)
@pytest.mark.parametrize("model", ["flux", "sd15"])
def test_package_made_files_read_bit_for_bit(tmp_path, qtype, model):
    if model == "flux":
        sd, arch, fix = flux_state_dict(FluxConfig(), "dev", seed=0), "flux", False
    else:
        sd, arch, fix = sd_unet_state_dict("sd15", "tiny", seed=0), "sd1", True
    path = tmp_path / f"{model}-{qtype}.gguf"
    write_reference_gguf(path, sd, qtype, arch, shape_fix=fix)
    ref = reference_values(path)
    src = open_model(path)
    assert isinstance(src, GGUFSource) and src.metadata["general.architecture"] == arch
    assert set(src.keys()) == set(sd)
    reader = gguf.GGUFReader(str(path))
    qtypes = {t.name: t.tensor_type.name for t in reader.tensors}
    reshaped = 0
    for k, want in sd.items():
        assert src.info(k).shape == tuple(want.shape), k  # reversed GGUF dims, or the orig_shape override
        got = src.get(k)
        assert tuple(got.shape) == tuple(want.shape)
        assert np.array_equal(bits(got), bits(ref[k])), k
        if qtypes[k] == qtype:
            assert src.info(k).dtype == torch.float32
            enc = src.encoding(k)
            assert enc.format == f"gguf:{qtype}" and enc.stored_dtype == torch.uint8
        else:
            assert src.encoding(k) is None and src.info(k).dtype == torch.float32  # F32: 1-D and small ones
        reshaped += reader.get_field(f"comfy.gguf.orig_shape.{k}") is not None
    assert (reshaped > 0) == fix
    summary = src.encodings_summary()
    assert summary[f"gguf {qtype}"] == sum(q == qtype for q in qtypes.values()) > 0
    assert sum(summary.values()) == len(sd)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", *LEGACY, "Q4_1",
                                   "Q5_0"])
def test_torch_kernels_match_the_package_on_random_blocks(qtype):
    block = gguf.GGML_QUANT_SIZES[T[qtype]][0]
    step = gguf_quants.CPU_CHUNK_VALUES // block
    # one step; several and a partial one; enough for several threads
    for n_blocks in (5, step * 2 + 3, step * (gguf_quants.PARALLEL_MIN_STEPS * 2 + 1) + 5):
        raw = random_blocks(qtype, n_blocks, seed=7)
        ref = gguf.quants.dequantize(raw, T[qtype])
        got = gguf_quants.dequantize(torch.from_numpy(raw), qtype, ref.shape)
        assert got.dtype == torch.float32
        assert np.array_equal(bits(got), bits(ref))


def _decode_in_child(raw: np.ndarray, q) -> None:
    ref = gguf.quants.dequantize(raw, T.Q8_0)
    q.put(bool(np.array_equal(bits(gguf_quants.dequantize(torch.from_numpy(raw), "Q8_0", ref.shape)), bits(ref))))


def test_parallel_decoding_survives_a_fork():
    """The decoding threads belong to the process that made them: a forked child (multiprocessing's default
    on Linux) decodes with threads of its own instead of waiting forever on its parent's."""
    import multiprocessing as mp

    raw = random_blocks("Q8_0", gguf_quants.CPU_CHUNK_VALUES // 32 * 16, seed=1)
    gguf_quants.dequantize(torch.from_numpy(raw), "Q8_0", (raw.shape[0] * 32,))  # the parent's pool exists now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_decode_in_child, args=(raw, q))
    p.start()
    p.join(120)
    if p.is_alive():
        p.kill()
        pytest.fail("decoding in a forked child hung")
    assert p.exitcode == 0 and q.get(timeout=5) is True


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "TQ2_0"])
def test_k_quant_tensor_in_a_file(tmp_path, qtype):
    """A K-quant (torch kernel) and a type with only the package's numpy decoder, stored in a file."""
    raw = random_blocks(qtype, 8 * 2, seed=3).reshape(8, -1)  # 8 rows of 512 values
    w = gguf.GGUFWriter(path=None, arch="flux")
    w.add_tensor("double_blocks.0.img_attn.proj.weight", raw, raw_dtype=T[qtype])
    path = tmp_path / "k.gguf"
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = GGUFSource(path)
    got = src.get("double_blocks.0.img_attn.proj.weight")
    assert tuple(got.shape) == (8, 512)
    assert np.array_equal(bits(got), bits(gguf.quants.dequantize(raw, T[qtype])))
    assert src.encodings_summary() == {f"gguf {qtype}": 1}


def test_decodes_on_the_device_asked(tmp_path):
    sd = flux_state_dict(FluxConfig(), "dev", seed=0)
    path = tmp_path / "m.gguf"
    write_reference_gguf(path, sd, "Q8_0", "flux")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    src = GGUFSource(path, device=dev)
    t = src.get("double_blocks.0.img_mlp.0.weight")
    assert t.device.type == dev
    assert np.array_equal(bits(t.cpu()), bits(reference_values(path)["double_blocks.0.img_mlp.0.weight"]))


# --- merge and extract like the dequantized twins --------------------------------------------------------------


@pytest.mark.parametrize("qtype", LEGACY)
def test_merge_equals_merge_of_dequantized_twins(tmp_path, flux_pair, qtype):
    base, tuned = flux_pair
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_reference_gguf(a, base, qtype, "flux")
    write_reference_gguf(b, tuned, qtype, "flux")
    ta, tb = twin_of(a, tmp_path / "a.safetensors"), twin_of(b, tmp_path / "b.safetensors")
    for method, weights in (("weighted_sum", [0.3, 0.7]), ("slerp", None)):
        got, want = tmp_path / f"g-{method}.safetensors", tmp_path / f"w-{method}.safetensors"
        merge([a, b], got, method, weights, dtype="fp32")
        merge([ta, tb], want, method, weights, dtype="fp32")
        g, w = load_file(got), load_file(want)
        assert set(g) == set(w) == set(base)
        for k in w:
            assert np.array_equal(bits(g[k]), bits(w[k])), (method, k)
    mixed = tmp_path / "mixed.safetensors"  # a GGUF file merged with a plain one lines up by key
    merge([a, tb], mixed, dtype="fp32")
    assert set(load_file(mixed)) == set(base)


@pytest.mark.parametrize("qtype", LEGACY)
def test_extract_equals_extract_from_dequantized_twin(tmp_path, flux_pair, qtype):
    base, tuned = flux_pair
    base_file = tmp_path / "base.safetensors"
    save_file(base, str(base_file))
    tuned_gguf = tmp_path / "tuned.gguf"
    write_reference_gguf(tuned_gguf, tuned, qtype, "flux")
    twin = twin_of(tuned_gguf, tmp_path / "tuned.safetensors")
    got, _ = extract_lora(base_file, tuned_gguf, rank=4, dtype="fp32", method="exact")
    want, _ = extract_lora(base_file, twin, rank=4, dtype="fp32", method="exact")
    g, w = lora_state_dict(got, "comfy", None), lora_state_dict(want, "comfy", None)
    assert set(g) == set(w) and w
    for k in w:
        assert torch.equal(g[k], w[k]), k


# --- writing ---------------------------------------------------------------------------------------------------

_BOUND = {"Q8_0": 1 / 127, "Q5_0": 1 / 15, "Q5_1": 1 / 31, "Q4_0": 1 / 7, "Q4_1": 1 / 15, "F16": 1e-3, "BF16": 1e-2}


def check_comfyui_gguf_layout(path: Path, intended: dict[str, torch.Tensor], arch: str) -> dict[str, str]:
    """What ComfyUI-GGUF's gguf_sd_loader checks and does, re-done with the package's reader: an image arch
    string, ComfyUI key names, torch shape = reversed dims or the INT32 orig_shape override. Returns the
    GGML type of each tensor."""
    r = gguf.GGUFReader(str(path))
    field = r.get_field("general.architecture")
    assert field.types == [gguf.GGUFValueType.STRING] and field.contents() == arch and arch in IMG_ARCH_LIST
    assert {t.name for t in r.tensors} == set(intended)
    types = {}
    for t in r.tensors:
        f = r.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if f is not None:
            assert f.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            shape = tuple(int(f.parts[i][0]) for i in f.data)
        else:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        assert shape == tuple(intended[t.name].shape), t.name
        types[t.name] = t.tensor_type.name
    return types


@pytest.mark.parametrize("out", ["gguf-q8_0", "gguf-q4_0", "gguf-q4_1", "gguf-q5_0", "gguf-q5_1", "gguf-f16",
                                 "gguf-bf16"])
def test_write_gguf_holds_the_weights_in_comfyui_gguf_layout(tmp_path, out):
    sd = flux_state_dict(FluxConfig(), "dev", seed=0)
    qtype = gguf_output_type(out)
    path = tmp_path / "m.gguf"
    write_gguf(path, sd, out)
    types = check_comfyui_gguf_layout(path, sd, "flux")
    ref = reference_values(path)
    for k, t in sd.items():
        want = "F32" if t.ndim == 1 or t.numel() <= 1024 else qtype if qtype in ("F16", "BF16") else \
            "F16" if k.startswith(("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")) \
            else qtype
        assert types[k] == want, k
        err = float((torch.from_numpy(ref[k]) - t).abs().max())
        assert err <= float(t.abs().max()) * (0 if want == "F32" else _BOUND[want]), (k, err)
    assert any(q == qtype for q in types.values())


def test_merge_to_gguf_is_the_package_quantization_of_the_fp32_merge(tmp_path, flux_pair, capsys):
    """Through the CLI: the file is exactly what the package's quantizer makes of the fp32 merge, whether the
    executor hands it whole tensors or row blocks."""
    base, tuned = flux_pair
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.bfloat16() for k, v in base.items()}, str(a))
    save_file({k: v.bfloat16() for k, v in tuned.items()}, str(b))
    fp32 = tmp_path / "m32.safetensors"
    merge([a, b], fp32, weights=[0.4, 0.6], dtype="fp32")
    exact = load_file(fp32)
    out = tmp_path / "m.gguf"
    run = _cli(capsys, "merge", a, b, "-o", out, "--weights", "0.4,0.6", "--dtype", "gguf-q8_0")
    assert run.returncode == 0, run.stderr
    from weightsmith.merge.execute import execute_merge
    from weightsmith.merge.plan import plan_merge

    rows = tmp_path / "rows.gguf"
    execute_merge(plan_merge([a, b], weights=[0.4, 0.6]), rows, "gguf-q8_0", chunk_elems=512)
    ref = reference_values(out)
    types = check_comfyui_gguf_layout(out, exact, "flux")
    for k, v in exact.items():
        q = T[types[k]]
        want = gguf.quants.dequantize(gguf.quants.quantize(v.numpy(), q), q) if types[k] != "F32" else v.numpy()
        assert np.array_equal(bits(ref[k]), bits(want)), k
    # the same tensor bytes; the metadata differs (each file's recipe names its own run, title and date)
    assert _data_section(out) == _data_section(rows)
    shown = _cli(capsys, "inspect", out)
    assert shown.returncode == 0 and "encoding of unet: gguf Q8_0 (" in shown.stdout


def _data_section(path) -> bytes:
    reader = gguf.GGUFReader(str(path))
    return path.read_bytes()[min(t.data_offset for t in reader.tensors):]


def test_sd_unet_to_gguf_keeps_orig_shapes(tmp_path):
    """SD UNets: tensors whose rows are not multiples of 256 are stored as rows of 256 with orig_shape, also
    when the merge hands them over in row blocks that split those rows."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sa, sb = sd_unet_state_dict("sd15", "tiny", seed=0), sd_unet_state_dict("sd15", "tiny", seed=1)
    save_file(sa, str(a))
    save_file(sb, str(b))
    from weightsmith.merge.execute import execute_merge
    from weightsmith.merge.plan import plan_merge

    out = tmp_path / "m.gguf"
    execute_merge(plan_merge([a, b]), out, "gguf-q5_1", chunk_elems=1000)
    merged = {k: (sa[k] + sb[k]) * 0.5 for k in sa}
    types = check_comfyui_gguf_layout(out, merged, "sd1")
    r = gguf.GGUFReader(str(out))
    assert any(r.get_field(f"comfy.gguf.orig_shape.{k}") is not None for k in types)
    src = GGUFSource(out)
    for k, v in merged.items():
        err = float((src.get(k).float() - v).abs().max())
        assert err <= float(v.abs().max()) * _BOUND["Q5_1"] * 1.01 + 1e-7, k


def test_k_types_cannot_be_written_and_say_so():
    with pytest.raises(WeightsmithError, match="cannot encode"):
        gguf_output_type("gguf-q4_k")
    with pytest.raises(WeightsmithError, match="unknown GGUF output type"):
        gguf_output_type("gguf-q9")
    assert gguf_output_type("bf16") is None


def test_gguf_output_refuses_text_encoders_and_never_replaces_an_input(tmp_path, flux_pair):
    base, _ = flux_pair
    full = {**{f"model.diffusion_model.{k}": v for k, v in base.items()},
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    a = tmp_path / "full.safetensors"
    save_file(full, str(a))
    with pytest.raises(WeightsmithError, match="--others drop"):
        merge([a, a], tmp_path / "x.gguf", dtype="gguf-q8_0")
    merge([a, a], tmp_path / "x.gguf", dtype="gguf-q8_0", others="drop")
    check_comfyui_gguf_layout(tmp_path / "x.gguf", base, "flux")  # the prefix is gone, as ComfyUI-GGUF expects
    g = tmp_path / "x.gguf"
    before = g.read_bytes()
    with pytest.raises(OutputPathError, match="one of the inputs"):
        merge([g, g], g, dtype="gguf-q8_0", overwrite=True)
    assert g.read_bytes() == before
    with pytest.raises(OutputPathError, match="overwrite"):
        merge([a, a], g, dtype="gguf-q8_0", others="drop")


def test_failed_write_leaves_no_file(tmp_path):
    sd = flux_state_dict(FluxConfig(), "dev", seed=0)
    path = tmp_path / "m.gguf"
    plan = {k: (tuple(v.shape), torch.float32) for k, v in sd.items()}
    with pytest.raises(RuntimeError, match="never written"):
        with GGUFStreamWriter(path, plan, qtype="Q8_0") as w:
            w.write("img_in.weight", sd["img_in.weight"])
    with pytest.raises(ValueError):
        with GGUFStreamWriter(path, plan, qtype="Q8_0") as w:
            w.write("img_in.weight", sd["txt_in.weight"])
    assert list(tmp_path.iterdir()) == []


# --- damaged and unsupported files -----------------------------------------------------------------------------


def _cli(capsys, *args: str) -> SimpleNamespace:
    """The CLI in-process: exit code and output (an unexpected exception would fail the test as a traceback)."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_truncated_or_corrupt_gguf_is_refused(tmp_path, capsys):
    sd = flux_state_dict(FluxConfig(), "dev", seed=0)
    good = tmp_path / "good.gguf"
    write_reference_gguf(good, sd, "Q8_0", "flux")
    data = good.read_bytes()
    cuts = {"empty": b"", "magic": data[:4], "header": data[:200], "tensor infos": data[:2000],
            "data": data[:len(data) * 2 // 3], "one byte short": data[:-33]}
    for what, blob in cuts.items():
        p = tmp_path / f"cut-{what.replace(' ', '_')}.gguf"
        p.write_bytes(blob)
        with pytest.raises(BadFileError, match=str(p.name)):
            open_model(p)
        run = _cli(capsys, "inspect", p)
        assert run.returncode == 2 and "Traceback" not in run.stderr and "download the file again" in run.stderr, what
    bad = tmp_path / "noise.bin"  # no extension, GGUF magic, garbage after it
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(BadFileError, match="noise.bin"):
        open_model(bad)


def _retype_first_tensor(src: Path, dst: Path, type_id: int) -> str:
    """A copy of `src` whose first tensor claims GGML type `type_id` (patched in the header)."""
    dst.write_bytes(src.read_bytes())
    r = gguf.GGUFReader(str(dst), "r+")
    t = r.tensors[0]
    t.field.parts[4][0] = type_id  # parts: name length, name, n_dims, dims, type, offset
    r.data.flush()
    return t.name


def test_unsupported_or_unknown_type_is_refused_naming_file_tensor_type(tmp_path, capsys):
    sd = flux_state_dict(FluxConfig(), "dev", seed=0)
    good = tmp_path / "good.gguf"
    write_reference_gguf(good, sd, "Q8_0", "flux")
    q81 = tmp_path / "q8_1.gguf"
    name = _retype_first_tensor(good, q81, int(T.Q8_1))  # a GGML type no decoder exists for
    with pytest.raises(BadFileError, match=rf"q8_1.gguf: tensor '{name}' is stored as GGUF Q8_1"):
        open_model(q81)
    unknown = tmp_path / "unknown.gguf"
    name = _retype_first_tensor(good, unknown, 99)
    with pytest.raises(BadFileError, match=rf"unknown.gguf: tensor '{name}' is stored in GGML type 99"):
        open_model(unknown)
    run = _cli(capsys, "merge", unknown, good, "-o", tmp_path / "out.safetensors")
    assert run.returncode == 2 and "GGML type 99" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_checks_the_output_name_against_the_dtype(tmp_path, capsys):
    run = _cli(capsys, "merge", "a.safetensors", "b.safetensors", "-o", tmp_path / "m.gguf")
    assert run.returncode == 2 and "--dtype gguf-q8_0" in run.stderr
    run = _cli(capsys, "merge", "a.safetensors", "b.safetensors", "-o", tmp_path / "m.safetensors", "--dtype",
               "gguf-q8_0")
    assert run.returncode == 2 and "must end in .gguf" in run.stderr


# --- ComfyUI-GGUF itself ---------------------------------------------------------------------------------------


@pytest.mark.comfy
@pytest.mark.skipif(comfyui_gguf_dir() is None, reason="no ComfyUI-GGUF copy (set COMFYUI_GGUF_PATH)")
@pytest.mark.parametrize("out", ["gguf-q8_0", "gguf-q4_1", "gguf-f16"])
def test_comfyui_gguf_loads_our_file_into_comfyui(comfy, tmp_path, out):
    """ComfyUI-GGUF's own gguf_sd_loader reads our SD1.5 file, its dequantize_tensor gives our decoded values
    (bit for bit in fp32; by default it multiplies in the scales' fp16, within fp16 rounding of ours), and
    ComfyUI builds the model from that state dict with ComfyUI-GGUF's ops, detected as SD1.5."""
    import comfy.sd
    import comfy.supported_models

    cg = import_comfyui_gguf()
    sd = sd_unet_state_dict("sd15", "tiny", seed=2)
    path = tmp_path / "sd15.gguf"
    write_gguf(path, sd, out)
    state, arch = cg.loader.gguf_sd_loader(str(path), return_arch=True)
    assert arch == "sd1" and set(state) == set(sd)
    ours = GGUFSource(path)
    for k in sd:
        mine = ours.get(k).float()
        theirs = cg.dequant.dequantize_tensor(state[k], dtype=torch.float32, dequant_dtype=torch.float32)
        assert tuple(theirs.shape) == tuple(sd[k].shape), k
        assert torch.equal(torch.as_tensor(theirs), mine), k
        default = torch.as_tensor(cg.dequant.dequantize_tensor(state[k], dtype=torch.float32))
        assert float((default - mine).abs().max()) <= 2e-3 * float(mine.abs().max()), k  # fp16 products and sums
    model = comfy.sd.load_diffusion_model_state_dict(state, model_options={"custom_operations": cg.ops.GGMLOps})
    assert type(model.model.model_config) is comfy.supported_models.SD15


@pytest.mark.comfy
def test_merge_files_node_reads_and_writes_gguf(comfy, tmp_path, monkeypatch, flux_pair):
    """The Merge Model Files node lists .gguf inputs (without ComfyUI-GGUF installed) and its gguf-… dtypes
    write a .gguf equal to the core merge's."""
    import folder_paths
    from comfy_support import import_pack

    node = import_pack().NODE_CLASS_MAPPINGS["WeightsmithMergeFiles"]
    dm, out_dir = tmp_path / "diffusion_models", tmp_path / "output"
    dm.mkdir()
    out_dir.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(dm)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "checkpoints", ([str(tmp_path / "ckpt")], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(folder_paths, "output_directory", str(out_dir))
    base, tuned = flux_pair
    write_reference_gguf(dm / "a.gguf", base, "Q8_0", "flux")
    save_file({k: v.bfloat16() for k, v in tuned.items()}, str(dm / "b.safetensors"))
    required = node.INPUT_TYPES()["required"]
    assert "diffusion_models/a.gguf" in required["model_a"][0]
    assert "gguf-q8_0" in required["dtype"][0] and "gguf-q4_k" not in required["dtype"][0]
    res = node().merge("diffusion_models/a.gguf", "diffusion_models/b.safetensors", "weighted_sum", "0.5,0.5", "",
                       "", "none", "take", "copy", "gguf-q5_1", False, "output", "merges/q")
    path = res["result"][0]
    assert path == str(out_dir / "merges" / "q_00001_.gguf")
    want = tmp_path / "want.gguf"
    merge([dm / "a.gguf", dm / "b.safetensors"], want, dtype="gguf-q5_1")
    assert _data_section(Path(path)) == _data_section(want)  # the same tensors; each recipe names its run
    check_comfyui_gguf_layout(Path(path), base, "flux")
