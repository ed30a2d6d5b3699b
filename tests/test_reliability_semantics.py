"""Inputs that are valid files but wrong together, through the CLI (and the core where the CLI hides the
detail): shape and dtype mismatches, a LoRA rank above the layer's dims, all-zero deltas, a LoRA for another
architecture, unknown keys, strengths of 0, negative and huge, empty inputs, the same file twice.

Each case either does the documented thing (checked numerically) or fails with exit status 2 and a
message naming the files and key involved and saying what to do; never a traceback, never an inf/NaN
written without a word, never a partial file. docs/reliability.md lists the behaviour of every case.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reliability_cases import assert_actionable, folder_state
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from weightsmith.cli import main as cli_main
from weightsmith.lora import keymaps
from weightsmith.lora.formats import load_lora, save_lora
from weightsmith.lora.model import LoRA, LoraTerm, ModuleDelta
from weightsmith.lora.testloras import flux_block_linears, random_lora
from weightsmith.sdunet import sd_unet_shapes, write_sd15_tiny
from weightsmith.testmodels import FluxConfig, finetune, flux_shapes, flux_state_dict

SHAPES = {k: tuple(s) for k, s in flux_shapes(FluxConfig(), "dev").items()}
SHAPED_KEY = "img_in.weight"


@dataclass
class Work:
    dir: Path
    base: Path
    tuned: Path
    other: Path
    fp32: Path
    reshaped: Path
    int_key: Path
    extra_key: Path
    empty: Path
    sd15_model: Path
    lora: Path
    lora2: Path
    sd15_lora: Path
    wide_lora: Path
    zero_lora: Path
    junk_lora: Path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    d = tmp_path_factory.mktemp("reliability_semantics")
    base = flux_state_dict(FluxConfig(), "dev", seed=1)

    def model(name: str, sd: dict, dtype=torch.bfloat16) -> Path:
        p = d / f"{name}.safetensors"
        save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, str(p))
        return p

    reshaped = dict(base)
    reshaped[SHAPED_KEY] = torch.zeros(base[SHAPED_KEY].shape[0], base[SHAPED_KEY].shape[1] // 2)
    int_key = dict(base)
    int_key[SHAPED_KEY] = torch.zeros(base[SHAPED_KEY].shape, dtype=torch.int32)
    extra = dict(finetune(base, seed=4, rank=4, scale=0.05))
    extra["junk_head.weight"] = torch.ones(3, 3)
    sd15 = d / "sd15.safetensors"
    write_sd15_tiny(sd15, seed=1)
    save_file({}, str(d / "empty.safetensors"))

    lora = random_lora(SHAPES, "flux", rank=4, seed=5, targets=flux_block_linears)
    save_lora(lora, d / "lora.safetensors", fmt="comfy")
    save_lora(random_lora(SHAPES, "flux", rank=2, seed=6, targets=flux_block_linears), d / "lora2.safetensors", fmt="kohya")
    save_lora(random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=4, seed=9), d / "sd15_lora.safetensors", fmt="kohya")
    # rank 128 on layers whose smaller dimension is 64: a valid LoRA, just wasteful
    wide = LoRA(arch="flux", source_format="comfy")
    g = torch.Generator().manual_seed(3)
    for key in ("double_blocks.0.img_attn.proj.weight", "single_blocks.0.linear2.weight"):
        out_dim, in_dim = SHAPES[key]
        wide.modules[keymaps.DIFFUSION + key[:-len(".weight")]] = ModuleDelta(terms=[LoraTerm(
            up=torch.randn(out_dim, 128, generator=g) * 0.02, down=torch.randn(128, in_dim, generator=g) * 0.02, alpha=128.0)])
    save_lora(wide, d / "wide_lora.safetensors", fmt="comfy")
    with safe_open(str(d / "lora.safetensors"), "pt") as f:
        lsd = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: torch.zeros_like(v) if "lora_up" in k else v for k, v in lsd.items()}, str(d / "zero_lora.safetensors"))
    junk = dict(lsd)
    junk["diffusion_model.not_a_layer.lora_up.weight"] = torch.zeros(4, 4)
    junk["text_encoders.mystery.weight"] = torch.zeros(2)
    save_file(junk, str(d / "junk_lora.safetensors"))
    return Work(d, model("base", base), model("tuned", finetune(base, seed=2, rank=4, scale=0.05)),
                model("other", finetune(base, seed=3, rank=4, scale=0.05)),
                model("fp32", finetune(base, seed=3, rank=4, scale=0.05), torch.float32),
                model("reshaped", reshaped), model("int_key", int_key), model("extra_key", extra),
                d / "empty.safetensors", sd15, d / "lora.safetensors", d / "lora2.safetensors",
                d / "sd15_lora.safetensors", d / "wide_lora.safetensors", d / "zero_lora.safetensors",
                d / "junk_lora.safetensors")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def refused(capsys, tmp_path, *argv) -> str:
    """Run a command that must fail cleanly: exit 2, `error: …`, and nothing new in tmp_path."""
    before = folder_state(tmp_path)
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, f"exit {rc}\nstdout: {out[-2000:]}\nstderr: {err}"
    assert err.startswith("error: ") and "Traceback" not in err
    assert folder_state(tmp_path) == before, "a refused command wrote something"
    return err


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def all_finite(path: Path) -> bool:
    return all(bool(t.float().isfinite().all()) for t in tensors(path).values())


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Module -> the dense change it applies (fp32), read back through the format reader."""
    lora = load_lora(path)
    return {name: m.dense_delta(SHAPES[keymaps.weight_key(name)]) for name, m in lora.modules.items() if m.terms}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ shape / dtype mismatches


def test_merge_shape_mismatch_names_key_and_files(work, tmp_path, capsys):
    err = refused(capsys, tmp_path, "merge", work.base, work.reshaped, "-o", tmp_path / "m.safetensors")
    assert_actionable(err, SHAPED_KEY, work.base.name, work.reshaped.name)
    assert "take:A" in err  # the rule that resolves it


def test_merge_dtype_kind_mismatch_names_key_and_files(work, tmp_path, capsys):
    err = refused(capsys, tmp_path, "merge", work.base, work.int_key, "-o", tmp_path / "m.safetensors")
    assert_actionable(err, SHAPED_KEY, work.base.name, work.int_key.name)


def test_merge_of_float_dtypes_keeps_a_dtypes(work, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc, _, err = run_cli(capsys, "merge", work.base, work.fp32, "-o", out)
    assert rc == 0, err
    assert {t.dtype for t in tensors(out).values()} == {torch.bfloat16}


def test_mix_shape_mismatch_kept_from_a_or_refused_on_request(work, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    rc, stdout, err = run_cli(capsys, "mix", work.base, work.tuned, work.reshaped, "-o", out)
    assert rc == 0 and f"kept {SHAPED_KEY}" in stdout, err
    assert torch.equal(tensors(out)[SHAPED_KEY], tensors(work.base)[SHAPED_KEY])
    out.unlink()
    err = refused(capsys, tmp_path, "mix", work.base, work.tuned, work.reshaped, "--on-mismatch", "error", "-o", out)
    assert_actionable(err, SHAPED_KEY, work.base, work.reshaped)


@pytest.mark.parametrize("command", ["extract", "validate"])
def test_extract_and_validate_shape_mismatch_names_key_and_files(work, tmp_path, capsys, command):
    argv = (["extract", work.base, work.reshaped, "-o", tmp_path / "e.safetensors"] if command == "extract"
            else ["validate", work.base, work.reshaped, work.lora])
    err = refused(capsys, tmp_path, *argv)
    assert_actionable(err, SHAPED_KEY, work.base, work.reshaped)


def test_compose_of_loras_for_different_widths_names_module_and_files(work, tmp_path, capsys):
    other = LoRA(arch="flux", source_format="comfy")
    other.modules[keymaps.DIFFUSION + "img_in"] = ModuleDelta(terms=[LoraTerm(up=torch.ones(32, 2), down=torch.ones(2, 64))])
    odd = tmp_path / "odd_width.safetensors"
    save_lora(other, odd)
    err = refused(capsys, tmp_path, "compose", work.lora, odd, "-o", tmp_path / "c.safetensors")
    assert_actionable(err, "img_in", work.lora.name, odd.name)


# ------------------------------------------------------------------------------ rank above the layer dims


def test_extract_rank_above_layer_dims_is_capped_and_exact(work, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    rc, _, err = run_cli(capsys, "extract", work.base, work.tuned, "--rank", "4096", "--dtype", "fp32", "-o", out)
    assert rc == 0, err
    lora = load_lora(out)
    base, tuned = tensors(work.base), tensors(work.tuned)
    for name, m in lora.modules.items():
        key = keymaps.weight_key(name)
        if not m.terms:
            continue
        assert m.rank <= min(SHAPES[key][0], math.prod(SHAPES[key][1:])), name
        want = tuned[key].float() - base[key].float()
        got = m.dense_delta(SHAPES[key])
        assert torch.linalg.vector_norm(got - want) <= 1e-4 * torch.linalg.vector_norm(want), name


def test_lora_with_rank_above_layer_dims_converts_composes_and_reranks(work, tmp_path, capsys):
    want = deltas(work.wide_lora)
    for argv in (["convert", work.wide_lora, "--to", "kohya", "-o", tmp_path / "k.safetensors"],
                 ["compose", work.wide_lora, "--rank", "4096", "-o", tmp_path / "c.safetensors"]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 0, err
        got = deltas(argv[-1])
        for name, d in want.items():
            assert torch.allclose(got[name], d, rtol=1e-4, atol=1e-6), (argv[0], name)
    rc, _, err = run_cli(capsys, "rerank", work.wide_lora, "--rank", "64", "-o", tmp_path / "r.safetensors")
    assert rc == 0, err
    reranked = load_lora(tmp_path / "r.safetensors")
    for name, d in want.items():
        m = reranked.modules[name]
        assert m.rank <= 64  # the layer's full rank: still exact
        assert torch.allclose(m.dense_delta(d.shape), d, rtol=1e-3, atol=1e-5), name


# ------------------------------------------------------------------------------ all-zero deltas


def test_zero_lora_compose_keeps_it_recompression_refuses_it(work, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    rc, _, err = run_cli(capsys, "compose", work.zero_lora, "-o", out)
    assert rc == 0, err
    assert all(float(d.abs().max()) == 0.0 for d in deltas(out).values())
    for argv in (["compose", work.zero_lora, "--rank", "2"], ["rerank", work.zero_lora, "--rank", "2"]):
        err = refused(capsys, tmp_path, *argv, "-o", tmp_path / "r.safetensors")
        assert_actionable(err, "r.safetensors")
        assert "no modules left" in err


def test_zero_lora_validates_as_reproducing_none_of_the_change(work, capsys):
    rc, stdout, err = run_cli(capsys, "validate", work.base, work.tuned, work.zero_lora)
    assert rc == 0, err
    assert "Relative error 1 (weighted mean 1)" in stdout, stdout[:500]


# ------------------------------------------------------------------------------ another architecture


def fill(argv: list[str], work: Work, tmp_path: Path) -> list[str]:
    """`{base}`, `{lora}`… -> the fixture's files; `{out}` -> a fresh output path."""
    names = {k: v for k, v in vars(work).items() if isinstance(v, Path)}
    return [a.format(out=tmp_path / "out.safetensors", **names) for a in argv]


@pytest.mark.parametrize("argv,names", [
    (["convert", "{sd15_lora}", "--target-arch", "flux", "-o", "{out}"], ["sd15_lora"]),
    (["convert", "{sd15_lora}", "--target-arch", "chroma", "-o", "{out}"], ["sd15_lora"]),
    (["convert", "{sd15_lora}", "--arch", "flux", "-o", "{out}"], ["sd15_lora"]),
    (["compose", "{lora}", "{sd15_lora}", "-o", "{out}"], ["lora", "sd15_lora"]),
    (["compose", "{sd15_lora}", "{lora}", "--target-arch", "chroma", "-o", "{out}"], ["lora", "sd15_lora"]),
    (["validate", "{base}", "{tuned}", "{sd15_lora}"], ["sd15_lora"]),
], ids=["convert_to_flux", "convert_to_chroma", "load_as_flux", "compose", "compose_for_chroma", "validate"])
def test_sd15_lora_for_flux_is_refused_everywhere(work, tmp_path, capsys, argv, names):
    err = refused(capsys, tmp_path, *fill(argv, work, tmp_path))
    assert_actionable(err, *(getattr(work, n).name for n in names))
    assert "sd15" in err


@pytest.mark.parametrize("argv", [
    ["merge", "{base}", "{sd15_model}", "-o", "{out}"],
    ["extract", "{base}", "{sd15_model}", "-o", "{out}"],
    ["mix", "{base}", "{tuned}", "{sd15_model}", "-o", "{out}"],
], ids=["merge", "extract", "mix"])
def test_models_of_different_architectures_are_refused_naming_the_files(work, tmp_path, capsys, argv):
    err = refused(capsys, tmp_path, *fill(argv, work, tmp_path))
    assert_actionable(err, work.sd15_model.name)


# ------------------------------------------------------------------------------ unknown keys


def test_unknown_lora_keys_are_reported_and_never_written(work, tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    rc, stdout, err = run_cli(capsys, "convert", work.junk_lora, "--to", "kohya", "-o", out)
    assert rc == 0, err
    assert "2 unknown keys" in stdout or "2 keys not understood" in stdout, stdout
    assert not [k for k in tensors(out) if "not_a_layer" in k or "mystery" in k]
    rc, stdout, _ = run_cli(capsys, "inspect", work.junk_lora)
    assert rc == 0 and "diffusion_model.not_a_layer.lora_up.weight" in stdout and "text_encoders.mystery.weight" in stdout
    rc, stdout, err = run_cli(capsys, "compose", work.junk_lora, "-o", tmp_path / "co.safetensors")
    assert rc == 0, err
    assert "not_a_layer" in stdout or "2 unknown" in stdout, stdout[-2000:]


def test_model_keys_only_in_one_input(work, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", work.base, work.extra_key, "-o", out)
    assert rc == 0, err
    assert "junk_head.weight" in stdout and torch.equal(tensors(out)["junk_head.weight"], torch.ones(3, 3))
    err = refused(capsys, tmp_path, "merge", work.base, work.extra_key, "--missing", "error", "-o", tmp_path / "e.safetensors")
    assert_actionable(err, "junk_head.weight")
    rc, stdout, err = run_cli(capsys, "mix", work.base, work.tuned, work.extra_key, "-o", tmp_path / "x.safetensors")
    assert rc == 0 and "no counterpart in a" in stdout and "junk_head.weight" in stdout, err
    assert "junk_head.weight" not in tensors(tmp_path / "x.safetensors")
    err = refused(capsys, tmp_path, "extract", work.base, work.extra_key, "-o", tmp_path / "e.safetensors")
    assert_actionable(err, "junk_head.weight", work.base, work.extra_key)


# ------------------------------------------------------------------------------ strengths and weights


def test_compose_strength_zero_negative_and_large(work, tmp_path, capsys):
    want = deltas(work.lora)
    err = refused(capsys, tmp_path, "compose", f"{work.lora}:0", "-o", tmp_path / "zero.safetensors")
    assert "no modules left" in err
    for strength in (-1.0, 1e6):
        out = tmp_path / f"s{strength:g}.safetensors"
        rc, _, err = run_cli(capsys, "compose", f"{work.lora}:{strength:g}", "-o", out)
        assert rc == 0, err
        assert all_finite(out)
        got = deltas(out)
        for name, d in want.items():
            assert torch.allclose(got[name], strength * d, rtol=1e-5, atol=1e-7 * abs(strength)), (strength, name)


@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_compose_refuses_non_finite_strength(work, tmp_path, capsys, bad):
    err = refused(capsys, tmp_path, "compose", f"{work.lora}:{bad}", "-o", tmp_path / "bad.safetensors")
    assert_actionable(err, work.lora.name)


@pytest.mark.parametrize("argv", [
    ["compose", "{lora}:1e39", "-o", "{out}"],  # finite for Python, infinite in fp32
    ["compose", "{lora}:1e14", "--rank", "2", "--dtype", "fp16", "-o", "{out}"],  # factors overflow fp16
], ids=["beyond_fp32", "fp16_overflow_recompressed"])
def test_compose_never_writes_inf_silently(work, tmp_path, capsys, argv):
    out = tmp_path / "o.safetensors"
    rc, stdout, err = run_cli(capsys, *[a.format(lora=work.lora, out=out) for a in argv])
    if rc == 2:
        assert not out.exists() and "Traceback" not in err
        assert_actionable(err, work.lora.name)
    else:
        assert rc == 0
        assert all_finite(out) or re.search(r"\b(NaN|Inf|overflow)", stdout), "inf/NaN written without a word"


def test_merge_weights_zero_and_negative(work, tmp_path, capsys):
    base, tuned = tensors(work.base), tensors(work.tuned)
    out = tmp_path / "w00.safetensors"
    rc, _, err = run_cli(capsys, "merge", work.base, work.tuned, "--weights", "0,0", "-o", out)
    assert rc == 2 and "every weight is 0" in err and not out.exists()  # it would write an all-zero model
    out = tmp_path / "extrapolate.safetensors"
    rc, _, err = run_cli(capsys, "merge", work.base, work.tuned, "--weights", "1.5,-0.5", "--dtype", "fp32", "-o", out)
    assert rc == 0, err
    got = tensors(out)
    for k in base:
        want = 1.5 * base[k].float() - 0.5 * tuned[k].float()
        assert torch.allclose(got[k], want, rtol=1e-6, atol=1e-6), k


def test_merge_overflowing_the_output_dtype_is_refused_or_reported(work, tmp_path, capsys):
    """1e9·(A − B) does not fit fp16: refused or reported, never written as inf without a word."""
    out = tmp_path / "overflow.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", work.base, work.tuned, "--weights", "1e9,-1e9", "--dtype", "fp16", "-o", out)
    if rc == 2:
        assert not out.exists()
    else:
        assert rc == 0
        assert all_finite(out) or "NaN/Inf" in stdout, "inf written without a warning"


def test_validate_and_mix_with_extreme_strengths_and_scales(work, tmp_path, capsys):
    for s in ("0", "-1", "1e6"):
        rc, stdout, err = run_cli(capsys, "validate", work.base, work.tuned, work.lora, "--strength", s)
        assert rc == 0, err
        assert "nan" not in stdout.lower().replace(work.lora.name, "")
    b, c = tensors(work.tuned), tensors(work.other)
    for alpha in ("1e6", "-1e6", "0", "1e40"):
        out = tmp_path / f"x{alpha}.safetensors"
        rc, _, err = run_cli(capsys, "mix", work.base, work.tuned, work.other, f"--alpha={alpha}", "-o", out)
        assert rc == 0, err
        for k, t in tensors(out).items():  # whatever the scale, every element is b's or c's, unscaled
            assert bool(((t == b[k]) | (t == c[k])).all()), (alpha, k)


# ------------------------------------------------------------------------------ option values


@pytest.mark.parametrize("argv", [
    ["extract", "{base}", "{tuned}", "--rank", "0", "-o", "{out}"],
    ["extract", "{base}", "{tuned}", "--rank-mode", "energy", "--energy", "2", "-o", "{out}"],
    ["extract", "{base}", "{tuned}", "--min-delta", "-1", "-o", "{out}"],
    ["extract", "{base}", "{tuned}", "--clamp-quantile", "1.5", "-o", "{out}"],
    ["extract", "{base}", "{tuned}", "--device", "cuda:99", "-o", "{out}"],
    ["compose", "{lora}", "--rank", "0", "-o", "{out}"],
    ["compose", "{lora}", "--energy", "1.5", "-o", "{out}"],
    ["rerank", "{lora}", "--rank", "-1", "-o", "{out}"],
    ["merge", "{base}", "{tuned}", "--weights", "a,b", "-o", "{out}"],
    ["merge", "{base}", "{tuned}", "--method", "ties", "--param", "density=x", "-o", "{out}"],
    ["merge", "{base}", "{tuned}", "--rule", "(unclosed=take:A", "-o", "{out}"],
    ["merge", "{base}", "{tuned}", "--device", "cuda:99", "-o", "{out}"],
    ["mix", "{base}", "{tuned}", "{other}", "--scales", "1,x", "-o", "{out}"],
    ["mix", "{base}", "{tuned}", "{other}", "--dtype", "fp7", "-o", "{out}"],
    ["mix", "{base}", "{tuned}", "{other}", "--device", "cuda:99", "-o", "{out}"],
], ids=["extract_rank0", "extract_energy2", "extract_min_delta", "extract_clamp", "extract_no_device", "compose_rank0",
        "compose_energy", "rerank_negative", "merge_weights", "merge_param", "merge_rule", "merge_no_device",
        "mix_scales", "mix_dtype", "mix_no_device"])
def test_invalid_option_values_are_refused_without_a_traceback(work, tmp_path, capsys, argv):
    err = refused(capsys, tmp_path, *fill(argv, work, tmp_path))
    assert_actionable(err)


# ------------------------------------------------------------------------------ empty inputs


@pytest.mark.parametrize("argv", [
    ["merge", "-o", "{out}"],
    ["merge", "{base}", "-o", "{out}"],
    ["mix", "{base}", "{tuned}", "-o", "{out}"],
    ["compose", "-o", "{out}"],
    ["merge", "{base}", "{tuned}", "--rule", ".*=drop", "-o", "{out}"],
], ids=["merge_none", "merge_one", "mix_one_candidate", "compose_none", "merge_all_dropped"])
def test_empty_input_lists_are_refused(work, tmp_path, capsys, argv):
    err = refused(capsys, tmp_path, *fill(argv, work, tmp_path))
    assert_actionable(err)


@pytest.mark.parametrize("argv,names", [
    (["merge", "{empty}", "{empty}", "-o", "{out}"], []),
    (["mix", "{empty}", "{base}", "{tuned}", "-o", "{out}"], ["empty"]),
    (["extract", "{empty}", "{base}", "-o", "{out}"], ["empty"]),
    (["convert", "{empty}", "-o", "{out}"], ["empty"]),
    (["compose", "{empty}", "-o", "{out}"], ["empty"]),
], ids=["merge", "mix", "extract", "convert", "compose"])
def test_files_without_tensors_are_refused(work, tmp_path, capsys, argv, names):
    err = refused(capsys, tmp_path, *fill(argv, work, tmp_path))
    assert_actionable(err, *(getattr(work, n) for n in names))


def test_merge_with_a_file_without_tensors_takes_a(work, tmp_path, capsys):
    """Keys missing from some inputs follow --missing (default take): an empty B gives a copy of A."""
    out = tmp_path / "m.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", work.base, work.empty, "-o", out)
    assert rc == 0 and "take A" in stdout, err
    assert all(torch.equal(t, tensors(work.base)[k]) for k, t in tensors(out).items())


# ------------------------------------------------------------------------------ the same file twice


def test_same_file_twice_gives_the_file_or_twice_its_change(work, tmp_path, capsys):
    base = tensors(work.base)
    rc, _, err = run_cli(capsys, "merge", work.base, work.base, "-o", tmp_path / "aa.safetensors")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "mix", work.base, work.base, work.base, "-o", tmp_path / "aaa.safetensors")
    assert rc == 0, err
    for name in ("aa", "aaa"):
        got = tensors(tmp_path / f"{name}.safetensors")
        assert set(got) == set(base) and all(torch.equal(got[k], base[k]) for k in base), name
    rc, _, err = run_cli(capsys, "compose", work.lora, work.lora, "-o", tmp_path / "xx.safetensors")
    assert rc == 0, err
    want, got = deltas(work.lora), deltas(tmp_path / "xx.safetensors")
    for name, d in want.items():
        assert torch.allclose(got[name], 2 * d, rtol=1e-5, atol=1e-8), name
    rc, stdout, _ = run_cli(capsys, "extract", work.base, work.base, "-o", tmp_path / "e.safetensors")
    assert rc == 1 and "nothing to extract" in stdout and not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize("argv,target", [
    (["merge", "{base}", "{tuned}", "-o", "{tuned}"], "{tuned}"),
    (["merge", "{base}", "{tuned}", "-o", "{link}", "--overwrite"], "{link}"),
    (["mix", "{base}", "{tuned}", "{other}", "-o", "{base}", "--overwrite"], "{base}"),
    (["extract", "{base}", "{tuned}", "-o", "{base}"], "{base}"),
    (["convert", "{lora}", "-o", "{lora}", "--overwrite"], "{lora}"),
    (["compose", "{lora}", "{lora2}", "-o", "{lora2}"], "{lora2}"),
    (["rerank", "{lora}", "--rank", "2", "-o", "{lora}"], "{lora}"),
], ids=["merge", "merge_via_symlink", "mix_overwrite", "extract", "convert_overwrite", "compose", "rerank"])
def test_output_that_is_an_input_is_refused_and_the_input_kept(work, tmp_path, capsys, argv, target):
    inputs = [work.base, work.tuned, work.lora, work.lora2]
    before = {p: sha(p) for p in inputs}
    link = tmp_path / "link.safetensors"
    link.symlink_to(work.base)
    names = {k: v for k, v in vars(work).items() if isinstance(v, Path)}
    rc, _, err = run_cli(capsys, *[a.format(link=link, **names) for a in argv])
    assert rc == 2 and err.startswith("error: "), err
    assert_actionable(err, target.format(link=link, **names))
    assert {p: sha(p) for p in inputs} == before
    assert link.is_symlink() and link.resolve() == work.base.resolve()


# ------------------------------------------------------------------------------ hostile key names

HTML_KEY = 'diffusion_model.<img src=x onerror="alert(1)">.lora_up.weight'


def test_hostile_key_names_are_reported_as_plain_text(work, tmp_path, capsys):
    """Key names come from downloaded files and end up in reports: they are listed verbatim (never dropped,
    never executed), and the web extension puts report text into the page only as text."""
    with safe_open(str(work.lora), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd[HTML_KEY] = torch.zeros(2, 2)
    hostile = tmp_path / "hostile_keys.safetensors"
    save_file(sd, str(hostile))
    out = tmp_path / "c.safetensors"
    rc, stdout, err = run_cli(capsys, "convert", hostile, "-o", out)
    assert rc == 0, err
    assert HTML_KEY not in tensors(out)
    rc, stdout, _ = run_cli(capsys, "inspect", hostile)
    assert rc == 0 and HTML_KEY in stdout
    script = (Path(__file__).resolve().parents[1] / "web" / "weightsmith.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, f"web/weightsmith.js uses {sink}: report text (with file key names) could run as HTML"
