"""Lossless mix (issue 7), core: the picking rule against the script's formula written plainly in fp32,
file mixes of Flux- and SD1.5-shaped models bit for bit, key scope, missing and mismatching keys, .ckpt
input, dry runs and the CLI."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith.cli import main as cli_main
from weightsmith.errors import MismatchError, WeightsmithError
from weightsmith.mix import lossless_mix, pick_among, pick_index, pick_nearest
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

# ---------------------------------------------------------------------------------------------------
# The independent reference: the losslessmix script's formula, written out in fp32.


def script_formula(a, b, c, alpha=1.0, beta=1.0, maxdiff=False):
    a, b, c = a.float(), b.float(), c.float()
    db = torch.abs(a - alpha * b)
    dc = torch.abs(a - beta * c)
    if maxdiff:
        return b * (db > dc) + c * (db <= dc)
    return c * (db > dc) + b * (db <= dc)


def assert_bits_equal(got: torch.Tensor, want_fp32: torch.Tensor, key: str = "") -> None:
    """`got` holds exactly the formula's values (converted to got's dtype, which must be exact), bit for
    bit; the formula's 0·x + y form can only differ on the sign of a zero, so zeros compare by value."""
    want = want_fp32.to(got.dtype)
    assert torch.equal(want.float(), want_fp32), f"{key}: reference not representable in {got.dtype}"
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    nonzero = want != 0
    assert torch.equal(got.view(ints)[nonzero], want.view(ints)[nonzero]), f"{key}: bits differ"
    assert torch.equal(got, want), f"{key}: values differ"


def read_all(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ---------------------------------------------------------------------------------------------------
# The rule


def test_worked_example_and_maxdiff_twin():
    a = torch.tensor([0.2, -0.02])
    b = torch.tensor([0.25, -0.06])
    c = torch.tensor([0.3, -0.03])
    assert torch.equal(pick_nearest(a, b, c), torch.tensor([0.25, -0.03]))
    assert torch.equal(pick_nearest(a, b, c, mode="max"), torch.tensor([0.3, -0.06]))
    # the script's own numbers, in the script's formula
    assert torch.equal(script_formula(a, b, c), torch.tensor([0.25, -0.03]))
    assert torch.equal(script_formula(a, b, c, maxdiff=True), torch.tensor([0.3, -0.06]))


def test_ties_scales_and_special_values():
    a = torch.tensor([0.0, 0.0, 1.0, 1.0])
    b = torch.tensor([1.0, 2.0, 2.0, -0.0])
    c = torch.tensor([-1.0, 0.5, 0.0, 3.0])
    # tie at element 0: min takes b, max takes c
    assert pick_nearest(a, b, c)[0] == 1.0
    assert pick_nearest(a, b, c, mode="max")[0] == -1.0
    # alpha biases only the comparison: |1 - 0.5*2| = 0 beats |1 - 0| = 1, and the written value is b's 2.0
    assert pick_nearest(a, b, c, alpha=0.5)[2] == 2.0
    assert pick_nearest(a, b, c)[2] in (2.0, 0.0)  # an exact tie without alpha: b
    assert pick_nearest(a, b, c)[2] == 2.0
    # -0.0 is written as -0.0 (the script's 0*c + b would give +0.0)
    assert torch.signbit(pick_nearest(a, b, c)[3])
    # NaN distance: not "farther", so min keeps b, max takes c; an inf not taken never leaks as NaN
    an = torch.tensor([float("nan"), 0.0])
    bn = torch.tensor([1.0, 0.1])
    cn = torch.tensor([2.0, float("inf")])
    assert torch.equal(pick_nearest(an, bn, cn), torch.tensor([1.0, 0.1]))
    assert torch.equal(pick_nearest(an, bn, cn, mode="max"), torch.tensor([2.0, float("inf")]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.95, 1.0), (1.0, 1.1)])
def test_random_tensors_match_the_formula_bit_for_bit(dtype, mode, alpha, beta):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 200, generator=g)
    b = (a + 0.02 * torch.randn(300, 200, generator=g)).to(dtype)
    c = (a + 0.02 * torch.randn(300, 200, generator=g)).to(dtype)
    a = a.to(dtype)
    got = pick_nearest(a, b, c, alpha, beta, mode)
    assert got.dtype == dtype and got.shape == a.shape
    assert_bits_equal(got, script_formula(a, b, c, alpha, beta, maxdiff=mode == "max"))


def test_mixed_dtypes_compare_in_fp32_and_write_the_promoted_dtype():
    g = torch.Generator().manual_seed(4)
    a32 = torch.randn(4096, generator=g)
    a = a32.to(torch.bfloat16)
    b = (a32 + 0.01 * torch.randn(4096, generator=g)).to(torch.float16)
    c = a32 + 0.01 * torch.randn(4096, generator=g)  # fp32
    got = pick_nearest(a, b, c)
    # fp16 + fp32 candidates → fp32 output, holding b's fp16 elements exactly
    assert got.dtype == torch.float32
    assert_bits_equal(got, script_formula(a, b, c))
    # bf16 + fp16 → fp32 (neither holds the other's values)
    got2 = pick_nearest(a, b, c.to(torch.bfloat16))
    assert got2.dtype == torch.float32
    assert_bits_equal(got2, script_formula(a, b, c.to(torch.bfloat16)))
    # an explicit output dtype rounds the picked element once
    pruned = pick_nearest(a, b, c, out_dtype=torch.float16)
    assert torch.equal(pruned, script_formula(a, b, c).to(torch.float16))
    # the comparison is fp32 even when every input is fp16: fp16 arithmetic would round |a - b| and tie here
    a16, b16, c16 = (torch.tensor([x], dtype=torch.float16) for x in (1.0, 1.0 + 2**-10, 1.0 - 2**-11))
    assert pick_nearest(a16, b16, c16).item() == c16.item()  # fp32: |a-c| = 2^-11 < |a-b| = 2^-10


def test_never_broadcasts():
    with pytest.raises(MismatchError):
        pick_nearest(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(4))
    with pytest.raises(ValueError):
        pick_nearest(torch.zeros(2), torch.zeros(2), torch.zeros(2), mode="median")


def test_n_candidates_fold_to_first_nearest_and_last_farthest():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-4, 5, (5000,), generator=g).half()  # small integers: plenty of exact ties
    xs = [torch.randint(-4, 5, (5000,), generator=g).half() for _ in range(4)]
    scales = [1.0, 0.5, 1.0, 2.0]
    d = torch.stack([(a.float() - s * x.float()).abs() for s, x in zip(scales, xs)])
    first_min = torch.argmin(d, dim=0)  # documented: the first minimal index
    last_max = d.shape[0] - 1 - torch.argmax(d.flip(0), dim=0)
    assert torch.equal(pick_index(a, xs, scales, "min").long(), first_min)
    assert torch.equal(pick_index(a, xs, scales, "max").long(), last_max)
    want = torch.stack(xs).gather(0, first_min[None])[0]
    assert torch.equal(pick_among(a, xs, scales, "min"), want)
    # with two candidates it is exactly pick_nearest
    for mode in ("min", "max"):
        assert torch.equal(pick_among(a, xs[:2], scales[:2], mode), pick_nearest(a, *xs[:2], *scales[:2], mode=mode))


# ---------------------------------------------------------------------------------------------------
# File mixes


@functools.cache
def flux_trio(dtype=torch.bfloat16, seed=0):
    base = flux_state_dict(FluxConfig(), "dev", seed=seed)
    a = {k: v.to(dtype) for k, v in base.items()}
    b = {k: v.to(dtype) for k, v in finetune(base, seed=seed + 1, rank=4, scale=0.05, noise=0.01).items()}
    c = {k: v.to(dtype) for k, v in finetune(base, seed=seed + 2, rank=4, scale=0.05, noise=0.01).items()}
    return a, b, c


@functools.lru_cache(maxsize=1)
def sd15_trio():
    from weightsmith.sdunet import sd_unet_state_dict

    base = sd_unet_state_dict("sd15", "tiny", seed=0)
    keys = sorted(base)[::3]  # fine-tune a third of the keys: the rest stay equal in all three (ties)
    a = {k: v.half() for k, v in base.items()}
    b = {k: v.half() for k, v in finetune(base, seed=1, rank=4, scale=0.05, noise=0.01, keys=keys).items()}
    c = {k: v.half() for k, v in finetune(base, seed=2, rank=4, scale=0.05, noise=0.01, keys=keys).items()}
    return a, b, c


def write_trio(tmp_path, trio, names=("a", "b", "c")):
    paths = []
    for name, sd in zip(names, trio):
        p = tmp_path / f"{name}.safetensors"
        save_file(sd, str(p))
        paths.append(p)
    return paths


def check_file_mix(tmp_path, trio, mode, alpha, beta, chunk=None):
    pa, pb, pc = write_trio(tmp_path, trio)
    out = tmp_path / f"out_{mode}_{alpha}_{beta}.safetensors"
    rep = lossless_mix(pa, pb, pc, alpha=alpha, beta=beta, mode=mode, out=out, chunk=chunk)
    got = read_all(out)
    a, b, c = trio
    assert set(got) == set(a) and rep.keys_mixed == len(a)
    for k in a:
        assert got[k].dtype == a[k].dtype
        assert_bits_equal(got[k], script_formula(a[k], b[k], c[k], alpha, beta, maxdiff=mode == "max"), k)
    unet = rep.rows[0]
    assert unet["group"] == "unet" and unet["from b"] + unet["from c"] == pytest.approx(1.0)
    return rep


@pytest.mark.parametrize("mode,alpha,beta", [("min", 1.0, 1.0), ("min", 0.95, 1.0), ("max", 1.0, 1.05)])
def test_flux_file_mix_equals_the_formula_bit_for_bit(tmp_path, mode, alpha, beta):
    check_file_mix(tmp_path, flux_trio(), mode, alpha, beta, chunk=4096)  # small chunks: many boundaries


def test_sd15_file_mix_equals_the_formula_bit_for_bit(tmp_path):
    trio = sd15_trio()  # the tiny SD1.5 UNet ComfyUI loads (18.7M parameters, fp16, 4-D convs)
    rep = check_file_mix(tmp_path, trio, "max", 0.95, 1.0)
    assert {r["group"] for r in rep.rows} >= {"input_blocks.1", "output_blocks.1", "time_embed", "out"}


def test_chunking_and_n_candidates_through_files(tmp_path):
    a, b, c = flux_trio(torch.float16, seed=3)
    d = {k: (v.float() * 1.01).half() for k, v in c.items()}
    pa, pb, pc, pd = write_trio(tmp_path, (a, b, c, d), names="abcd")
    one = tmp_path / "one.safetensors"
    many = tmp_path / "many.safetensors"
    lossless_mix(pa, candidates=[pb, pc, pd], scales=[1.0, 0.9, 1.0], out=one, chunk=1 << 30)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # three worker stripes per tensor, under inference mode as inside ComfyUI
    try:
        with torch.inference_mode():
            rep = lossless_mix(pa, candidates=[pb, pc, pd], scales=[1.0, 0.9, 1.0], out=many, chunk=777)
    finally:
        torch.set_num_threads(threads)
    x, y = read_all(one), read_all(many)
    for k in a:
        assert torch.equal(x[k].view(torch.int16), y[k].view(torch.int16)), k
        assert torch.equal(x[k], pick_among(a[k], [b[k], c[k], d[k]], [1.0, 0.9, 1.0]))
    row = rep.rows[0]
    assert row["from b"] + row["from c"] + row["from d"] == pytest.approx(1.0)


def full_checkpoint(sd_unet, seed):
    """A ComfyUI full-checkpoint layout: diffusion model, text encoder, VAE, a schedule and an int buffer."""
    g = torch.Generator().manual_seed(seed)
    out = {f"model.diffusion_model.{k}": v for k, v in sd_unet.items()}
    out["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = torch.randn(64, 32, generator=g)
    out["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(32, generator=g)
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3, generator=g)
    out["first_stage_model.decoder.conv_out.bias"] = torch.randn(3, generator=g)
    out["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000) + seed
    return out


def test_full_checkpoint_layout_scope_and_bare_candidates(tmp_path):
    a, b, c = flux_trio(torch.float32, seed=4)
    fa, fb, fc = (full_checkpoint(x, s) for x, s in ((a, 10), (b, 11), (c, 12)))
    pa, pb, pc = write_trio(tmp_path, (fa, fb, fc))
    # default: only the diffusion model is mixed; te, vae, schedule and int buffers stay a's
    out = tmp_path / "unet_only.safetensors"
    rep = lossless_mix(pa, pb, pc, out=out)
    got = read_all(out)
    assert set(got) == set(fa)
    for k, v in fa.items():
        if k.startswith("model.diffusion_model."):
            short = k[len("model.diffusion_model."):]
            assert_bits_equal(got[k], script_formula(a[short], b[short], c[short]), k)
        else:
            assert torch.equal(got[k], v) and got[k].dtype == v.dtype, k
    assert rep.keys_mixed == len(a)
    assert sorted(rep.copied["outside scope"]) == sorted(
        k for k in fa if k.startswith(("cond_stage_model.", "first_stage_model.", "alphas"))
        and fa[k].is_floating_point())
    assert rep.copied["not float"] == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    # text encoders and VAE opt in by their own names
    out2 = tmp_path / "all.safetensors"
    rep2 = lossless_mix(pa, pb, pc, out=out2, include=["unet", "te", "vae"])
    got2 = read_all(out2)
    for k in fa:
        if k.startswith(("cond_stage_model.", "first_stage_model.")) and fa[k].is_floating_point():
            assert_bits_equal(got2[k], script_formula(fa[k], fb[k], fc[k]), k)
    assert torch.equal(got2["alphas_cumprod"], fa["alphas_cumprod"])  # 'other' is never mixed
    groups = {r["group"]: r for r in rep2.rows}
    assert groups["unet"]["keys"] == len(a) and groups["te"]["keys"] == 2 and groups["vae"]["keys"] == 2
    assert groups["vae"]["elements"] == 8 * 3 * 3 * 3 + 3
    only_vae = tmp_path / "vae.safetensors"
    lossless_mix(pa, pb, pc, out=only_vae, include=["vae"])
    got3 = read_all(only_vae)
    assert torch.equal(got3["model.diffusion_model.img_in.weight"], fa["model.diffusion_model.img_in.weight"])
    k = "first_stage_model.encoder.conv_in.weight"
    assert_bits_equal(got3[k], script_formula(fa[k], fb[k], fc[k]), k)
    # a bare diffusion-model file lines up with a full checkpoint's diffusion model
    bare_b = tmp_path / "bare_b.safetensors"
    save_file(b, str(bare_b))
    out4 = tmp_path / "bare.safetensors"
    lossless_mix(pa, bare_b, pc, out=out4)
    got4 = read_all(out4)
    for short in a:
        k = "model.diffusion_model." + short
        assert_bits_equal(got4[k], script_formula(a[short], b[short], c[short]), k)


def test_missing_extra_and_mismatching_keys(tmp_path):
    a, b, c = flux_trio(seed=5)
    c = {k: v for k, v in c.items() if not k.startswith("guidance_in.")}  # a schnell-like candidate
    b = dict(b)
    b["extra_only_in_b.weight"] = torch.zeros(3)
    b["img_in.weight"] = torch.zeros(a["img_in.weight"].shape[0], 7, dtype=torch.bfloat16)  # shape differs
    b["txt_in.bias"] = torch.zeros(a["txt_in.bias"].shape, dtype=torch.int32)  # kind differs
    pa, pb, pc = write_trio(tmp_path, (a, b, c))
    out = tmp_path / "out.safetensors"
    rep = lossless_mix(pa, pb, pc, out=out)
    got = read_all(out)
    missing = sorted(k for k in a if k.startswith("guidance_in."))
    assert sorted(rep.copied["missing"]) == missing
    assert sorted(rep.copied["mismatch"]) == ["img_in.weight", "txt_in.bias"]
    assert "c.safetensors" in rep.details[missing[0]]
    assert "(64, 7)" in rep.details["img_in.weight"]
    assert rep.extra == {str(pb): ["extra_only_in_b.weight"]}
    for k in missing + ["img_in.weight", "txt_in.bias"]:
        assert torch.equal(got[k], a[k]), k
    mixed = [k for k in a if k not in missing and k not in ("img_in.weight", "txt_in.bias")]
    assert rep.keys_mixed == len(mixed)
    for k in mixed:
        assert_bits_equal(got[k], script_formula(a[k], b[k], c[k]), k)
    text = rep.text()
    assert "kept from a (missing)" in text and "kept from a (mismatch)" in text
    # or stop: a clear error naming the key, and no file
    out_err = tmp_path / "err.safetensors"
    with pytest.raises(MismatchError, match="img_in.weight"):
        lossless_mix(pa, pb, pc, out=out_err, on_mismatch="error")
    assert not out_err.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors",
                                                           "out.safetensors"]


def test_ckpt_inputs(tmp_path):
    a, b, c = flux_trio(seed=6)
    pa = tmp_path / "a.ckpt"
    torch.save({"state_dict": a}, pa)
    (pb,) = write_trio(tmp_path, (b,), names=("b",))
    pc = tmp_path / "c.pt"
    torch.save(c, pc)
    out = tmp_path / "out.safetensors"
    lossless_mix(pa, pb, pc, out=out, mode="max")
    got = read_all(out)
    for k in a:
        assert_bits_equal(got[k], script_formula(a[k], b[k], c[k], maxdiff=True), k)


def test_dry_run_writes_nothing_and_reports_per_group(tmp_path):
    a, b, c = flux_trio(torch.float32, seed=7)
    pa, pb, pc = write_trio(tmp_path, (a, b, c))
    before = sorted(tmp_path.iterdir())
    out = tmp_path / "never.safetensors"
    rep = lossless_mix(pa, pb, pc, out=out, dry_run=True, alpha=0.97)
    assert sorted(tmp_path.iterdir()) == before and not out.exists() and rep.out is None
    # recompute the double_blocks.0 row independently
    keys = [k for k in a if k.startswith("double_blocks.0.")]
    va, vb, vc = (torch.cat([x[k].reshape(-1).double() for k in keys]) for x in (a, b, c))
    picked = torch.cat([script_formula(a[k], b[k], c[k], 0.97).reshape(-1).double() for k in keys])
    from_c = sum(int(((a[k] - 0.97 * b[k]).abs() > (a[k] - c[k]).abs()).sum()) for k in keys)
    row = next(r for r in rep.rows if r["group"] == "double_blocks.0")
    assert row["keys"] == len(keys) and row["elements"] == va.numel()
    assert row["cos a~b"] == pytest.approx(float(va @ vb / (va.norm() * vb.norm())), rel=1e-5)
    assert row["cos a~c"] == pytest.approx(float(va @ vc / (va.norm() * vc.norm())), rel=1e-5)
    assert row["from c"] == pytest.approx(from_c / va.numel())
    assert row["from b"] == pytest.approx(1 - from_c / va.numel())
    assert row["mean |change|"] == pytest.approx(float((picked - va).abs().mean()), rel=1e-5)
    ties = sum(int(((a[k] - 0.97 * b[k]).abs() == (a[k] - c[k]).abs()).sum()) for k in keys)
    assert row["ties"] == ties / va.numel()
    data = rep.to_json()
    json.dumps(data)
    assert data["dry_run"] is True and data["output"] is None
    assert "cos a~b" in rep.table() and "dry run: nothing written" in rep.text()
    img = rep.chart()
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 0
    # a dry run without statistics still lists the plan
    plan_only = lossless_mix(pa, pb, pc, dry_run=True, stats=False)
    assert plan_only.rows[0]["keys"] == len(a) and math.isnan(plan_only.rows[0]["from b"])


def test_report_flags_a_reference_that_is_a_blend_of_the_candidates():
    a, b, c = flux_trio(torch.float32, seed=7)
    plain = lossless_mix(a, b, c, dry_run=True)
    assert plain.rows[0]["blend_residual"] > 0.1 and "blend" not in plain.text()
    blend = {k: 0.3 * b[k] + 0.7 * c[k] for k in a}
    rep = lossless_mix(blend, b, c, dry_run=True)
    assert rep.rows[0]["blend_ratio"] == pytest.approx(0.3, abs=1e-3)
    assert rep.rows[0]["blend_residual"] < 1e-3
    assert rep.rows[0]["from c"] == 1.0  # a 0.3/0.7 blend is nearer c in every element
    assert "WARNING: a is almost exactly a blend of b and c (a ≈ 0.30·b + 0.70·c" in rep.text()
    assert "note: c supplied 100.0%" in rep.text()


def test_nan_and_inf_inputs_are_reported_and_follow_the_rule(tmp_path):
    a, b, c = (dict(x) for x in flux_trio(torch.float32, seed=12))
    a["img_in.weight"] = a["img_in.weight"].clone()
    a["img_in.weight"][0, 0] = float("nan")
    c["txt_in.weight"] = c["txt_in.weight"].clone()
    c["txt_in.weight"][1, 1] = float("inf")
    pa, pb, pc = write_trio(tmp_path, (a, b, c))
    out = tmp_path / "out.safetensors"
    rep = lossless_mix(pa, pb, pc, out=out, chunk=100)
    assert rep.nonfinite == {str(pa): ["img_in.weight"], str(pc): ["txt_in.weight"]}
    assert "hold NaN/Inf" in rep.text()
    got = read_all(out)
    assert got["img_in.weight"][0, 0] == b["img_in.weight"][0, 0]  # NaN distance: min keeps b
    assert got["txt_in.weight"][1, 1] == b["txt_in.weight"][1, 1]  # an infinite c is never nearer
    for k in a:
        want = script_formula(a[k], b[k], c[k])
        # where an input is NaN/Inf the script's products give 0 or NaN (its bug, not a rule): skip those
        ok = torch.isfinite(a[k]) & torch.isfinite(b[k]) & torch.isfinite(c[k])
        assert torch.equal(got[k][ok], want[ok]), k


def test_refusals_write_nothing(tmp_path):
    a, b, c = flux_trio(seed=8)
    pa, pb, pc = write_trio(tmp_path, (a, b, c))
    with pytest.raises(WeightsmithError, match="output"):
        lossless_mix(pa, pb, pc)  # no output and no dry run
    with pytest.raises(WeightsmithError, match="inputs"):
        lossless_mix(pa, pb, pc, out=pb, overwrite=True)  # never replaces an input
    with pytest.raises(WeightsmithError, match="include"):
        lossless_mix(pa, pb, pc, dry_run=True, include=["clip"])
    with pytest.raises(MismatchError, match="nothing to mix"):
        lossless_mix(pa, pb, pc, dry_run=True, include=["vae"])

    def interrupt(done, total):
        if done == 5:
            raise KeyboardInterrupt

    out = tmp_path / "int.safetensors"
    with pytest.raises(KeyboardInterrupt):
        lossless_mix(pa, pb, pc, out=out, progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]


def test_cli(tmp_path, capsys):
    a, b, c = flux_trio(seed=9)
    pa, pb, pc = write_trio(tmp_path, (a, b, c))
    out = tmp_path / "cli.safetensors"
    rj = tmp_path / "r.json"
    png = tmp_path / "r.png"
    code = cli_main(["mix", str(pa), str(pb), str(pc), "-o", str(out), "--alpha", "0.95", "--maxdiff",
                     "--report", str(rj), "--chart", str(png)])
    assert code == 0
    got = read_all(out)
    for k in a:
        assert_bits_equal(got[k], script_formula(a[k], b[k], c[k], 0.95, 1.0, maxdiff=True), k)
    data = json.loads(rj.read_text())
    assert data["mode"] == "max" and data["scales"] == [0.95, 1.0] and data["keys_mixed"] == len(a)
    assert "from b" in data["groups"][0] and math.isnan(data["groups"][0]["cos a~b"])  # shares only
    out2 = tmp_path / "cli2.safetensors"
    assert cli_main(["mix", str(pa), str(pb), str(pc), "-o", str(out2), "--report", str(rj)]) == 2  # exists
    assert not out2.exists()
    rj2 = tmp_path / "r2.json"
    assert cli_main(["mix", str(pa), str(pb), str(pc), "-o", str(out2), "--stats", "--report", str(rj2)]) == 0
    assert not math.isnan(json.loads(rj2.read_text())["groups"][0]["cos a~b"])
    out2.unlink()
    rj2.unlink()
    assert png.stat().st_size > 1000
    assert "lossless mix (max" in capsys.readouterr().out
    assert cli_main(["mix", str(pa), str(pb), str(pc), "--dry-run", "--include", "unet"]) == 0
    assert "dry run" in capsys.readouterr().out
    assert cli_main(["mix", str(pa), str(pb), str(pc), "--include", "unet,clip", "--dry-run"]) == 2
    assert cli_main(["mix", str(pa), str(pb), str(pc)]) == 2  # no -o and no --dry-run
    assert "error:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors",
                                                           "cli.safetensors", "r.json", "r.png"]
