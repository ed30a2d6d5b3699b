"""Bake: LoRAs written into a model file key by key. Baked weights equal base + Σ strength·ΔW computed here
from the factors directly (split q/k/v on fused rows, bias diffs, per-block rules, text encoders of a full
checkpoint, OpenCLIP in_proj slices); unpatched keys are byte copies; mismatches are refused before any
work; nothing is left behind on errors or interrupts; the CLI exits 2 with a message."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.bake import bake, execute_bake, plan_bake
from weightsmith.cli import main
from weightsmith.errors import MismatchError, OutputPathError, WeightsmithError
from weightsmith.lora import keymaps as km
from weightsmith.lora.formats import load_lora, save_lora
from weightsmith.lora.model import LoRA, LoraTerm, ModuleDelta
from weightsmith.lora.testloras import random_lora
from weightsmith.sdunet import sd_unet_shapes, sd_unet_state_dict
from weightsmith.testmodels import FluxConfig, flux_shapes, flux_state_dict

CFG = FluxConfig()


def _files(tmp_path, dtype=torch.float32):
    sd = {k: v.to(dtype) for k, v in flux_state_dict(CFG, "dev", seed=1).items()}
    model = tmp_path / "flux.safetensors"
    save_file(sd, str(model))
    l1 = random_lora(flux_shapes(CFG), "flux", rank=4, seed=1, with_bias=True, scale=0.1)
    l2 = random_lora(flux_shapes(CFG), "flux", rank=8, seed=2, scale=0.1)
    save_lora(l1, tmp_path / "l1.safetensors", fmt="comfy")
    save_lora(l2, tmp_path / "l2.safetensors", fmt="diffusers")  # split q/k/v(/mlp): row slices of qkv / linear1
    return sd, model, tmp_path / "l1.safetensors", tmp_path / "l2.safetensors", l1, l2


def _reference(sd, chain, factor=lambda lora_i, key: 1.0):
    """base + Σ s·(alpha/r)·up@down (+ s·diff_b) per key, from the canonical factors, in fp32."""
    out = {}
    for key, w in sd.items():
        ref = w.float().clone()
        for i, (lora, s) in enumerate(chain):
            f = s * factor(i, key)
            if key.endswith(".bias"):
                mod = lora.modules.get(km.DIFFUSION + key[: -len(".bias")])
                if mod is not None and mod.diff_b is not None:
                    ref += f * mod.diff_b.float()
                continue
            mod = lora.modules.get(km.module_of_key(key) or "")
            for t in (mod.terms if mod else []):
                d = (t.up.float().flatten(1) @ t.down.float().flatten(1)) * (t.alpha / t.rank)
                s0, n = t.rows or (0, ref.shape[0])
                ref[s0 : s0 + n] += f * d.reshape(n, *ref.shape[1:])
        out[key] = ref
    return out


def test_baked_weights_equal_base_plus_strength_times_delta(tmp_path):
    sd, model, p1, p2, l1, l2 = _files(tmp_path)
    out = tmp_path / "out.safetensors"
    rep = bake(model, [(p1, 0.8), (p2, -0.6)], out, rules=["@single=0.5"])
    got = load_file(str(out))
    assert list(got) == list(load_file(str(model)))  # the model's keys, in its order
    want = _reference(sd, [(l1, 0.8), (l2, -0.6)], lambda i, k: 0.5 if k.startswith("single_blocks.") else 1.0)
    changed = 0
    for k in sd:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
        changed += not torch.equal(got[k], sd[k])
    assert changed == len(rep.patched) > 20
    assert rep.plan.rule_hits["@single=0.5"] > 0 and rep.plan.unmatched == []
    # l2 came in diffusers names: its q/k/v slices land on the rows of the fused weights
    assert any(t.rows for m in load_lora(p2, arch="flux").modules.values() for t in m.terms)
    # row blocks that cut through the q/k/v slices give the same weights
    small = tmp_path / "small-blocks.safetensors"
    execute_bake(plan_bake(model, [(p1, 0.8), (p2, -0.6)], ["@single=0.5"]), small, task_elems=64 * 5)
    for k, t in load_file(str(small)).items():
        torch.testing.assert_close(t, want[k], rtol=1e-6, atol=1e-6, msg=k)
    meta = json.loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["weightsmith.bake"])
    assert [x["strength"] for x in meta["loras"]] == [0.8, -0.6]


def test_bf16_model_keeps_dtype_and_unpatched_keys_are_byte_copies(tmp_path):
    sd, model, p1, _, l1, _ = _files(tmp_path, torch.bfloat16)
    lora = random_lora(flux_shapes(CFG), "flux", rank=4, seed=3, targets=lambda k: k.startswith("double_blocks."))
    save_lora(lora, tmp_path / "blocks.safetensors")
    out = tmp_path / "out.safetensors"
    rep = bake(model, [tmp_path / "blocks.safetensors"], out)
    got = load_file(str(out))
    want = _reference(sd, [(lora, 1.0)])
    for k in sd:
        assert got[k].dtype == torch.bfloat16
        if k in rep.plan.patches:
            assert torch.equal(got[k], want[k].to(torch.bfloat16)) or \
                float((got[k].float() - want[k]).abs().max()) <= float(want[k].abs().max()) * 2 ** -7, k
        else:
            assert torch.equal(got[k].view(torch.int16), sd[k].view(torch.int16)), k  # bit for bit
    assert rep.copied == len(sd) - len(rep.patched) and rep.cast == 0
    # an explicit dtype casts every float key, patched or not
    out16 = tmp_path / "fp16.safetensors"
    bake(model, [tmp_path / "blocks.safetensors"], out16, dtype="fp16")
    assert {t.dtype for t in load_file(str(out16)).values()} == {torch.float16}
    # plain fp8 (as Save LoRA and Merge Model Files offer it): a saturating cast of the fp32 result, which
    # ComfyUI loads as an fp8 model; scaled fp8 (scale tensors beside the weights) is not written by bake
    out8 = tmp_path / "fp8.safetensors"
    bake(model, [tmp_path / "blocks.safetensors"], out8, dtype="fp8_e4m3fn")
    got8 = load_file(str(out8))
    assert {t.dtype for t in got8.values()} == {torch.float8_e4m3fn}
    for k in rep.plan.patches:
        finfo = torch.finfo(torch.float8_e4m3fn)
        assert torch.equal(got8[k], got[k].float().clamp(finfo.min, finfo.max).to(torch.float8_e4m3fn)) or \
            float((got8[k].float() - want[k]).abs().max()) <= float(want[k].abs().max()) * 2 ** -3, k
    with pytest.raises(WeightsmithError, match="quantized outputs are not supported"):
        bake(model, [p1], tmp_path / "q.safetensors", dtype="fp8_scaled")


def test_text_encoders_of_a_full_checkpoint_are_patched(tmp_path):
    """SD1.5 layout (`cond_stage_model.transformer.`) and SDXL's OpenCLIP clip_g: q/k/v modules patch row thirds
    of `in_proj_weight`, biases too; a bare UNet lists the text-encoder modules as unmatched."""
    unet = sd_unet_state_dict("sdxl", "tiny", seed=1)
    gen = torch.Generator().manual_seed(0)
    d = 96
    te = {
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(256, 64, generator=gen),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * d, d, generator=gen),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_bias": torch.randn(3 * d, generator=gen),
        "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": torch.randn(4 * d, d, generator=gen),
    }
    ckpt = {"model.diffusion_model." + k: v for k, v in unet.items()} | te
    save_file(ckpt, str(tmp_path / "ckpt.safetensors"))
    save_file(unet, str(tmp_path / "unet.safetensors"))

    def term(o, i, seed):
        g = torch.Generator().manual_seed(seed)
        return LoraTerm(up=torch.randn(o, 2, generator=g) * 0.1, down=torch.randn(2, i, generator=g) * 0.1, alpha=1.0)

    lora = random_lora(sd_unet_shapes("sdxl", "tiny"), "sdxl", rank=2, seed=4, targets=lambda k: "attn2.to_k" in k)
    mods = {("clip_l", "mlp.fc1"): (256, 64), ("clip_g", "self_attn.k_proj"): (d, d), ("clip_g", "mlp.fc1"): (4 * d, d)}
    for j, ((enc, leaf), (o, i)) in enumerate(mods.items()):
        lora.modules[km.te_name(enc, f"text_model.encoder.layers.0.{leaf}")] = ModuleDelta(terms=[term(o, i, j)])
    kb = lora.modules[km.te_name("clip_g", "text_model.encoder.layers.0.self_attn.k_proj")]
    kb.diff_b = torch.randn(d, generator=gen) * 0.1
    out = tmp_path / "out.safetensors"
    rep = bake(tmp_path / "ckpt.safetensors", [(lora, 0.5)], out)
    got = load_file(str(out))
    assert rep.plan.unmatched == []

    def delta(enc, leaf):
        t = lora.modules[km.te_name(enc, f"text_model.encoder.layers.0.{leaf}")].terms[0]
        return 0.5 * (t.up @ t.down) * (t.alpha / t.rank)

    fc1 = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(got[fc1], te[fc1] + delta("clip_l", "mlp.fc1"))
    inp = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    want = te[inp].clone()
    want[d : 2 * d] += delta("clip_g", "self_attn.k_proj")
    torch.testing.assert_close(got[inp], want)
    bias = inp.replace("weight", "bias")
    want_b = te[bias].clone()
    want_b[d : 2 * d] += 0.5 * kb.diff_b
    torch.testing.assert_close(got[bias], want_b)
    cfc = "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"
    torch.testing.assert_close(got[cfc], te[cfc] + delta("clip_g", "mlp.fc1"))

    rep = bake(tmp_path / "unet.safetensors", [lora], tmp_path / "unet-out.safetensors")
    reasons = {u["module"]: u["reason"] for u in rep.plan.unmatched}
    assert len(reasons) == 3 and set(reasons.values()) == {"the model file has no text encoder"}
    assert "3 LoRA modules match nothing" in rep.table()


def test_arch_mismatch_refused_before_any_work(tmp_path):
    _, model, *_ = _files(tmp_path)
    sd_lora = random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=2)
    save_lora(sd_lora, tmp_path / "sd.safetensors", fmt="kohya")
    out = tmp_path / "out.safetensors"
    with pytest.raises(MismatchError, match="SD1.5.*Flux|Flux.*SD1.5"):
        bake(model, [tmp_path / "sd.safetensors"], out)
    assert not out.exists()


def test_shape_mismatch_names_module_and_both_shapes(tmp_path):
    _, model, *_ = _files(tmp_path)
    wide = random_lora(flux_shapes(FluxConfig(hidden=128)), "flux", rank=2, targets=lambda k: "img_attn.proj" in k)
    with pytest.raises(MismatchError, match=r"double_blocks\.0\.img_attn\.proj.*\[64, 64\].*\[128, 128\]"):
        plan_bake(model, [wide])


def test_unmatched_modules_listed_and_strict_refuses(tmp_path):
    sd, model, p1, _, l1, _ = _files(tmp_path)
    extra = random_lora(flux_shapes(FluxConfig(depth=3)), "flux", rank=2, targets=lambda k: "img_attn.proj" in k)
    plan = plan_bake(model, [extra])
    assert sorted(u["module"] for u in plan.unmatched) == [
        "diffusion_model.double_blocks.1.img_attn.proj", "diffusion_model.double_blocks.2.img_attn.proj"]
    assert any("2 LoRA modules match nothing" in n for n in plan.notes)
    out = tmp_path / "strict.safetensors"
    with pytest.raises(MismatchError, match="match nothing.*double_blocks.1"):
        bake(model, [extra], out, strict=True)
    assert not out.exists()


def test_nonfinite_result_refused_and_nothing_written(tmp_path):
    sd, model, *_ = _files(tmp_path)
    lora = random_lora(flux_shapes(CFG), "flux", rank=2, targets=lambda k: "txt_in" in k, scale=1.0)
    out = tmp_path / "out.safetensors"
    with pytest.raises(WeightsmithError, match=r"txt_in\.weight.*fp16.*range"):
        bake(model, [(lora, 1e5)], out, dtype="fp16")
    assert not out.exists() and list(tmp_path.glob("*.tmp*")) == []


def test_interrupt_leaves_no_file_and_output_never_replaces_an_input(tmp_path):
    _, model, p1, p2, *_ = _files(tmp_path)
    out = tmp_path / "out.safetensors"

    def stop(done, total):
        if done > 3:
            raise KeyboardInterrupt

    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        bake(model, [p1, p2], out, progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    for target in (model, p1):
        with pytest.raises(OutputPathError, match="one of the inputs"):
            bake(model, [p1, p2], target, overwrite=True)


def test_cli_bake_and_exit_codes(tmp_path, capsys):
    sd, model, p1, p2, l1, l2 = _files(tmp_path)
    out, rep = tmp_path / "cli.safetensors", tmp_path / "r.json"
    assert main(["bake", str(model), f"{p1}:0.8", f"{p2}:-0.6", "-o", str(out), "--rule", "@single=0.5",
                 "--report", str(rep)]) == 0
    want = _reference(sd, [(l1, 0.8), (l2, -0.6)], lambda i, k: 0.5 if k.startswith("single_blocks.") else 1.0)
    got = load_file(str(out))
    for k in sd:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    data = json.loads(rep.read_text())
    assert data["patched_keys"] > 20 and [x["strength"] for x in data["plan"]["loras"]] == [0.8, -0.6]
    assert "keys patched" in capsys.readouterr().out

    sd_lora = tmp_path / "sd.safetensors"
    save_lora(random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=2), sd_lora, fmt="kohya")
    cases = [
        ([str(model), str(sd_lora), "-o", str(tmp_path / "x.safetensors")], "SD1.5"),
        ([str(model), str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "x.safetensors")], "no such LoRA"),
        ([str(model), f"{p1}:abc", "-o", str(tmp_path / "x.safetensors")], "FILE:STRENGTH"),
        ([str(model), str(p1), "-o", str(p1), "--overwrite"], "one of the inputs"),
        ([str(model), str(p1), "-o", str(out)], "refusing to overwrite"),
        ([str(model), str(p1)], "-o OUT"),
        ([str(model), str(p1), "-o", str(tmp_path / "x.safetensors"), "--rule", "@single=abc"], "PATTERN=FACTOR"),
        ([str(model), str(p1), "-o", str(tmp_path / "x.safetensors"), "--device", "cuda:7"], "cuda"),
    ]
    for argv, needle in cases:
        assert main(["bake", *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    assert not (tmp_path / "x.safetensors").exists()


def test_lora_objects_and_strength_zero(tmp_path):
    sd, model, *_ = _files(tmp_path)
    lora = LoRA(arch="flux")
    lora.modules["diffusion_model.img_in"] = ModuleDelta(diff=torch.ones(64, 64))
    lora.modules["diffusion_model.txt_in"] = ModuleDelta(diff=torch.ones(64, 32))
    out = tmp_path / "o.safetensors"
    rep = bake(model, [(lora, 2.0, ["txt_in=0"])], out)
    got = load_file(str(out))
    torch.testing.assert_close(got["img_in.weight"], sd["img_in.weight"] + 2.0)
    assert torch.equal(got["txt_in.weight"], sd["txt_in.weight"]) and rep.patched == ["img_in.weight"]


def test_scaled_fp8_model_is_decoded_and_baked_to_a_plain_dtype(tmp_path):
    """A ComfyUI scaled-fp8 model reads decoded (weight · scale, exactly); the LoRA is added in fp32 and the
    result written in the dtype asked for; `keep` writes scaled fp8 again: every fp8 weight with a fresh
    scale from its baked values (an unpatched one comes back bit for bit), the rest as the model has it."""
    from weightsmith.encodings.encode import dequantize_fp8
    from weightsmith.encodings.testfiles import scaled_fp8
    from weightsmith.sources import open_model

    enc = scaled_fp8(flux_state_dict(CFG, "dev", seed=1))
    model = tmp_path / "fp8.safetensors"
    save_file(enc.tensors, str(model))
    decoded = open_model(model)
    lora = random_lora(flux_shapes(CFG), "flux", rank=4, seed=7, scale=0.1)
    keep = tmp_path / "keep.safetensors"
    rep = bake(model, [(lora, 0.5), ], keep, rules=[r"@single=0"])
    assert rep.encodings and rep.to_dict()["encodings"] == rep.encodings
    raw, stored = load_file(str(keep)), load_file(str(model))
    assert set(raw) == set(stored) and raw["scaled_fp8"].dtype == stored["scaled_fp8"].dtype
    want_keep = _reference({k: decoded.get(k) for k in decoded.keys()}, [(lora, 0.5)],
                           lambda i, k: 0.0 if k.startswith("single_blocks.") else 1.0)
    fp8 = [k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn and k != "scaled_fp8"]
    assert fp8 and all(raw[k].dtype == torch.float8_e4m3fn for k in fp8)
    for k in fp8:
        got = dequantize_fp8(raw[k], raw[k[: -len("weight")] + "scale_weight"])
        if k in rep.patched:  # within fp8 rounding of the baked values: half a step of e4m3 (3 mantissa bits)
            torch.testing.assert_close(got, want_keep[k], rtol=2 ** -4, atol=float(want_keep[k].abs().max()) * 2 ** -9)
        else:
            assert torch.equal(raw[k].view(torch.uint8), stored[k].view(torch.uint8)), k
    assert any(k in rep.patched for k in fp8) and any(k not in rep.patched for k in fp8)
    out = tmp_path / "out.safetensors"
    bake(model, [(lora, 0.5)], out, dtype="fp32")
    got = load_file(str(out))
    assert set(got) == set(decoded.keys()) and "scaled_fp8" not in got
    want = _reference({k: decoded.get(k) for k in decoded.keys()}, [(lora, 0.5)])
    for k, t in got.items():
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, want[k], rtol=1e-6, atol=1e-6, msg=k)


def test_keep_on_a_gguf_model_is_refused_before_any_work_and_bf16_works(tmp_path):
    """GGUF is read decoded but bake cannot write it back: `keep` says what to choose, nothing is written."""
    from gguf_support import write_reference_gguf

    sd = flux_state_dict(CFG, "dev", seed=1)
    model = tmp_path / "flux.gguf"
    write_reference_gguf(model, sd, "Q8_0", "flux")
    lora = random_lora(flux_shapes(CFG), "flux", rank=4, seed=7, scale=0.1)
    with pytest.raises(WeightsmithError, match=r"stored as .*Q8_0.*'keep' cannot keep it: choose bf16, fp16 or fp32"):
        bake(model, [lora], tmp_path / "keep.safetensors")
    assert not (tmp_path / "keep.safetensors").exists()
    rep = bake(model, [(lora, 0.5)], tmp_path / "out.safetensors", dtype="bf16")
    assert rep.patched and {t.dtype for t in load_file(str(tmp_path / "out.safetensors")).values()} == {torch.bfloat16}
