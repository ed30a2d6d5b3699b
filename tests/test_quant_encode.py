"""Encoded outputs (issue 14, output side): merge and mix write ComfyUI scaled fp8 and mixed precision with
scales recomputed from the fp32 results, decode to those results within half an fp8 step, keep exactly
the layers the first input had quantized, and refuse what they cannot write back."""

from __future__ import annotations

import json
import re

import pytest
import torch
from quant_support import DecodedSource, comfy_quantize, dequantized, write_mixed, write_scaled_fp8
from safetensors import safe_open

from weightsmith.encodings.base import KeyEncoding
from weightsmith.encodings.encode import (
    OutputLayout,
    finite_amax,
    fp8_scale,
    parse_output,
    quantizable,
    quantize_fp8,
)
from weightsmith.errors import WeightsmithError
from weightsmith.merge import execute_merge, plan_merge
from weightsmith.mix import lossless_mix
from weightsmith.sources import DictSource
from weightsmith.testmodels import FluxConfig, flux_state_dict

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MANTISSA = {E4M3: (3, -6), E5M2: (2, -14)}  # mantissa bits, smallest normal exponent


def half_step(v: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """Half the spacing of `fp8` values at |v| (an upper bound for round-to-nearest's error there)."""
    mant, emin = MANTISSA[fp8]
    e = torch.floor(torch.log2(v.abs().clamp_min(2.0 ** emin)))
    return torch.exp2(e - mant) / 2


def assert_within_fp8(decoded: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, fp8: torch.dtype, key=""):
    """Per element: |decoded - want| <= half an fp8 step of want / scale, times scale (+ fp32 rounding)."""
    bound = half_step(want / scale, fp8) * scale * (1 + 1e-6) + want.abs() * 2e-7
    err = (decoded - want).abs()
    assert bool((err <= bound).all()), f"{key}: worst excess {float((err - bound).max()):g}"


def small(seed: int) -> dict[str, torch.Tensor]:
    return flux_state_dict(FluxConfig(), "dev", seed=seed)


@pytest.fixture(scope="module")
def pair():
    return small(0), small(1)


def _fp32_merge(sa, sb, wa=0.5, wb=0.5) -> dict[str, torch.Tensor]:
    return {k: wa * sa.get(k).float() + wb * sb.get(k).float() for k in sa.keys()}


# --- the pure functions -------------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", [E4M3, E5M2])
def test_quantize_decodes_within_half_a_step(fp8):
    gen = torch.Generator().manual_seed(0)
    for mag in (1e-5, 1e-2, 1.0, 300.0):
        w = torch.randn(97, 65, generator=gen) * mag
        w[0, :3] = torch.tensor([0.0, -0.0, w.abs().max()])
        scale = fp8_scale(finite_amax(w), fp8)
        assert scale.dtype == torch.float32 and scale.shape == ()
        q = quantize_fp8(w, scale, fp8)
        assert q.dtype == fp8 and float(q.float().abs().max()) == {E4M3: 448.0, E5M2: 57344.0}[fp8]
        assert_within_fp8(q.float() * scale, w, scale, fp8)
    zero = torch.zeros(4, 4)
    assert float(fp8_scale(finite_amax(zero), fp8)) == 1.0  # amax 0: scale 1, payload zeros
    assert not quantize_fp8(zero, torch.tensor(1.0), fp8).float().any()


def test_comfy_quantized_values_reencode_bit_for_bit():
    """A weight ComfyUI quantized (its amax on the fp8 maximum) decodes and re-encodes to the same bytes
    and scale: keys taken unchanged from a scaled-fp8 input come back as they were."""
    gen = torch.Generator().manual_seed(3)
    for fp8 in (E4M3, E5M2):
        for _ in range(50):
            w = torch.randn(32, 48, generator=gen) * float(10 ** torch.empty(1).uniform_(-4, 2, generator=gen))
            q, s = comfy_quantize(w, fp8)
            y = q.float() * s
            s2 = fp8_scale(finite_amax(y), fp8)
            assert torch.equal(s2, s)
            assert torch.equal(quantize_fp8(y, s2, fp8).view(torch.uint8), q.view(torch.uint8))


def test_parse_output_and_what_fp8_scaled_quantizes():
    assert parse_output(None).keep and parse_output("keep").keep
    assert parse_output("bf16").dtype == torch.bfloat16
    assert parse_output("fp8_scaled").encode.fp8 == E4M3 and parse_output("fp8_scaled_e5m2").encode.fp8 == E5M2
    with pytest.raises(WeightsmithError, match="fp8_scaled"):
        parse_output("int4")
    assert quantizable("double_blocks.0.img_attn.qkv.weight", (9216, 3072))
    assert not quantizable("double_blocks.0.img_attn.qkv.bias", (9216,))
    assert not quantizable("double_blocks.0.img_attn.norm.query_norm.scale", (128,))
    assert not quantizable("input_blocks.0.0.weight", (320, 4, 3, 3))  # a convolution
    assert not quantizable("tok.token_embedding.weight", (1000, 64))  # not a Linear in ComfyUI


# --- merge --------------------------------------------------------------------------------------------

def test_merge_keep_scaled_fp8_decodes_to_the_fp32_merge(pair, tmp_path):
    a, b = pair
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    write_scaled_fp8(pa, a, input_scale=0.25, marker_numel=0)
    write_scaled_fp8(pb, b)
    sa, sb = DecodedSource(pa), DecodedSource(pb)
    # small row blocks: the two passes (amax, then quantize) run over several blocks per key
    rep = execute_merge(plan_merge([sa, sb], "weighted_sum", [0.5, 0.5]), out, "keep", chunk_elems=64)
    want = _fp32_merge(sa, sb)
    quantized = {k for k in sa.keys() if sa.encoding(k) is not None}
    assert rep.encodings == {"fp8_scaled (fp8_e4m3fn)": len(quantized), "bf16": len(want) - len(quantized)}
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        marker = f.get_tensor("scaled_fp8")
        assert marker.dtype == E4M3 and marker.numel() == 0  # A's own marker (fp8 matmul with A's input scales)
        for k in want:
            t = f.get_tensor(k)
            if k in quantized:
                layer = k[: -len(".weight")]
                scale = f.get_tensor(f"{layer}.scale_weight")
                assert t.dtype == E4M3 and scale.shape == () and scale.dtype == torch.float32
                # a fresh scale from the merged weights, never a merge of the inputs' scales
                assert torch.equal(scale, fp8_scale(float(want[k].abs().max()), E4M3))
                assert float(f.get_tensor(f"{layer}.scale_input")) == 0.25  # A's activation scale, copied
                assert_within_fp8(t.float() * scale, want[k], scale, E4M3, k)
            else:  # biases, norms, convolutions: A's dtype, one rounding of the fp32 merge
                assert t.dtype == torch.bfloat16 and torch.equal(t, want[k].to(torch.bfloat16)), k
    assert keys == set(want) | {"scaled_fp8"} | {k[:-7] + s for k in quantized for s in (".scale_weight", ".scale_input")}
    # the report's statistics are those of the fp32 merge
    assert all(k.finite for k in rep.key_stats)


def test_merge_keep_mixed_precision_lists_exactly_the_layers_written(pair, tmp_path):
    a, b = pair
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    write_mixed(pa, a, input_scale=0.5)
    write_mixed(pb, b)
    sa, sb = DecodedSource(pa), DecodedSource(pb)
    # a rule drops one quantized layer: the metadata must not list it
    dropped = "double_blocks.0.img_attn.qkv.weight"
    plan = plan_merge([sa, sb], "weighted_sum", [0.3, 0.7], rules=[f"{dropped.replace('.', '[.]')}=drop"])
    execute_merge(plan, out, None)
    want = _fp32_merge(sa, sb, 0.3, 0.7)
    with safe_open(str(out), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        expect = {k[: -len(".weight")] for k in sa.keys() if sa.encoding(k) is not None and k != dropped}
        assert set(layers) == expect and {v["format"] for v in layers.values()} == {"float8_e4m3fn"}
        assert "scaled_fp8" not in f.keys() and dropped not in f.keys()
        for layer in expect:
            q, s = f.get_tensor(f"{layer}.weight"), f.get_tensor(f"{layer}.weight_scale")
            assert float(f.get_tensor(f"{layer}.input_scale")) == 0.5
            assert_within_fp8(q.float() * s, want[f"{layer}.weight"], s, E4M3, layer)


def test_merge_to_plain_drops_inherited_quantization_metadata(pair, tmp_path):
    """bf16 out of mixed-precision inputs: no stale `_quantization_metadata` (ComfyUI would treat the
    bf16 layers as fp8), the weights equal the fp32 merge rounded once."""
    a, b = pair
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    write_mixed(pa, a)
    write_mixed(pb, b)
    sa, sb = DecodedSource(pa), DecodedSource(pb)
    sa.metadata["_quantization_metadata"] = "{}"  # as if a source passed it through
    execute_merge(plan_merge([sa, sb], "weighted_sum", [0.5, 0.5]), out, "bf16")
    want = _fp32_merge(sa, sb)
    with safe_open(str(out), "pt") as f:
        assert "_quantization_metadata" not in (f.metadata() or {})
        assert set(f.keys()) == set(want)
        for k in want:
            assert torch.equal(f.get_tensor(k), want[k].to(torch.bfloat16)), k


@pytest.mark.parametrize("choice,fp8", [("fp8_scaled", E4M3), ("fp8_scaled_e5m2", E5M2)])
def test_explicit_fp8_scaled_from_plain_inputs(pair, tmp_path, choice, fp8):
    a, b = pair
    out = tmp_path / "o.safetensors"
    sa, sb = DictSource({k: v.to(torch.bfloat16) for k, v in a.items()}), DictSource({k: v.to(torch.bfloat16) for k, v in b.items()})
    rep = execute_merge(plan_merge([sa, sb], "weighted_sum", [0.5, 0.5]), out, choice)
    want = _fp32_merge(sa, sb)
    linear = {k for k, t in want.items() if k.endswith(".weight") and t.ndim == 2}
    assert linear and rep.dtype == choice
    dec = dequantized(out)
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("scaled_fp8").dtype == fp8 and f.get_tensor("scaled_fp8").numel() == 2
        for k in want:
            t = f.get_tensor(k)
            if k in linear:
                s = f.get_tensor(k[:-7] + ".scale_weight")
                assert t.dtype == fp8
                assert_within_fp8(dec[k], want[k], s, fp8, k)
            else:
                assert t.dtype == torch.bfloat16, k  # the inputs' dtype


def test_explicit_fp8_scaled_in_a_full_checkpoint_marks_the_model_prefix(tmp_path):
    p = "model.diffusion_model."
    a = {p + "x.weight": torch.randn(8, 4), p + "x.bias": torch.randn(8), "cond_stage_model.t.weight": torch.randn(8, 4)}
    b = {k: v + 1 for k, v in a.items()}
    out = tmp_path / "o.safetensors"
    execute_merge(plan_merge([a, b], "weighted_sum", [0.5, 0.5]), out, "fp8_scaled")
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor(p + "scaled_fp8").dtype == E4M3
        assert f.get_tensor(p + "x.weight").dtype == E4M3 and (p + "x.scale_weight") in f.keys()
        assert f.get_tensor("cond_stage_model.t.weight").dtype == torch.float32  # outside the diffusion model


class _EncodedDict(DictSource):
    """A decoded source whose keys report a given encoding (what the decode side hands the merge)."""

    def __init__(self, tensors, encodings, name):
        super().__init__({k: v.float() for k, v in tensors.items()}, name=name)
        self._enc = encodings

    def encoding(self, key):
        return self._enc.get(key)

    def side_tensor(self, raw_key):
        raise KeyError(raw_key)


@pytest.mark.parametrize("fmt,stored", [("gguf:Q8_0", torch.uint8), ("comfy_quant:int8_tensorwise", torch.int8),
                                        ("diffusers_fp8", E4M3)])
def test_keep_refuses_an_encoding_it_cannot_write_and_the_asked_fallback_works(tmp_path, fmt, stored):
    t = {"blk.lin.weight": torch.randn(6, 4), "blk.lin.bias": torch.randn(6)}
    enc = {"blk.lin.weight": KeyEncoding(fmt, stored, (6, 4), {})}
    a, b = _EncodedDict(t, enc, "a.gguf"), _EncodedDict(t, enc, "b.gguf")
    out = tmp_path / "o.safetensors"
    with pytest.raises(WeightsmithError, match=rf"'blk.lin.weight' is stored as {fmt}.*a.gguf.*fp8_scaled.*bf16.*Nothing was written"):
        execute_merge(plan_merge([a, b], "weighted_sum", [0.5, 0.5]), out, "keep")
    assert not out.exists() and not list(tmp_path.iterdir())
    rep = execute_merge(plan_merge([a, b], "weighted_sum", [0.5, 0.5]), out, "bf16")  # the user's explicit choice
    assert rep.dtype == "bfloat16" and safe_open(str(out), "pt").get_tensor("blk.lin.weight").dtype == torch.bfloat16


def test_keep_refuses_legacy_and_mixed_precision_in_one_file(pair, tmp_path):
    a, b = pair
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_scaled_fp8(pa, a)
    write_mixed(pb, b)
    key = "time_in.in_layer.weight"
    plan = plan_merge([DecodedSource(pa), DecodedSource(pb)], "weighted_sum", [0.5, 0.5],
                      rules=[f"^{key.replace('.', '[.]')}$=take:B"])
    with pytest.raises(WeightsmithError, match="cannot load both in one file"):
        execute_merge(plan, tmp_path / "o.safetensors", "keep")
    assert not (tmp_path / "o.safetensors").exists()


def test_keep_refuses_encodings_outside_the_diffusion_model():
    layout = OutputLayout("keep", "model.diffusion_model.")
    enc = KeyEncoding("fp8_scaled", E4M3, (4, 4), {})
    with pytest.raises(WeightsmithError, match="only for the 2-D weights of the diffusion model"):
        layout.add("text_encoders.t5xxl.x.weight", (4, 4), torch.float32, None, enc)


def test_encoded_nonfinite_input_is_reported_on_a_dry_run_and_never_written(pair, tmp_path):
    """A NaN in a decoded input: a dry run lists the key; a real run refuses (a merge never writes NaN/Inf,
    whatever the input policy) and leaves no file."""
    a, b = pair
    key = "time_in.out_layer.weight"
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    write_scaled_fp8(pa, dict(a))
    write_scaled_fp8(pb, b)
    sa, sb = DecodedSource(pa), DecodedSource(pb)
    bad = sa.get(key).clone()
    bad[0, 0] = float("nan")
    sa._load = lambda k, _orig=sa._load: bad if k == key else _orig(k)
    rep = execute_merge(plan_merge([sa, sb], "weighted_sum", [0.5, 0.5]), None, "keep")
    assert rep.nonfinite_keys() == [key]
    with pytest.raises(WeightsmithError, match=re.escape(key)):
        execute_merge(plan_merge([sa, sb], "weighted_sum", [0.5, 0.5]), out, "keep")
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_merge_methods_that_need_the_whole_tensor_encode_too(pair, tmp_path):
    a, b = pair
    pa, pb, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "o.safetensors"
    write_scaled_fp8(pa, a)
    write_scaled_fp8(pb, b)
    sa, sb = DecodedSource(pa), DecodedSource(pb)
    execute_merge(plan_merge([sa, sb], "slerp", [0.5, 0.5]), out, "keep")
    from weightsmith.merge.methods import METHODS

    dec = dequantized(out)
    with safe_open(str(out), "pt") as f:
        for k in (k for k in sa.keys() if sa.encoding(k) is not None):
            want = METHODS["slerp"].fn([sa.get(k).float(), sb.get(k).float()], [0.5, 0.5], **METHODS["slerp"].defaults)
            assert_within_fp8(dec[k], want, f.get_tensor(k[:-7] + ".scale_weight"), E4M3, k)


# --- mix ----------------------------------------------------------------------------------------------

def test_mix_keep_writes_the_references_encoding_within_fp8_rounding(tmp_path):
    paths = []
    for i in range(3):
        p = tmp_path / f"{'abc'[i]}.safetensors"
        write_scaled_fp8(p, small(i))
        paths.append(p)
    srcs = [DecodedSource(p) for p in paths]
    out = tmp_path / "mix.safetensors"
    rep = lossless_mix(srcs[0], srcs[1], srcs[2], out=out)
    assert "fp8 rounding, not bit for bit" in rep.text()
    assert rep.out_dtypes["fp8_scaled (fp8_e4m3fn)"] == sum(srcs[0].encoding(k) is not None for k in srcs[0].keys())
    dec = dequantized(out)
    with safe_open(str(out), "pt") as f:
        for k in srcs[0].keys():
            x, y, z = (s.get(k).float() for s in srcs)
            pick = torch.where((x - y).abs() > (x - z).abs(), z, y)  # compared on the decoded values
            if srcs[0].encoding(k) is None:
                assert torch.equal(dec[k], pick), k
            else:
                assert_within_fp8(dec[k], pick, f.get_tensor(k[:-7] + ".scale_weight"), E4M3, k)


class _NoRawAccess(DecodedSource):
    """A decoded source that hands out activation scales and its marker only, never a stored payload."""

    def side_tensor(self, raw_key):
        if not raw_key.endswith((".scale_input", "scaled_fp8")):
            raise KeyError(raw_key)
        return super().side_tensor(raw_key)


def test_row_decoding_of_payloads_equals_reading_decoded_tensors(pair, tmp_path):
    """The executor decodes scaled-fp8 inputs by row blocks when a source hands out the stored payload;
    the output is the same, bit for bit, as when it reads the source's whole decoded tensors."""
    a, b = pair
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_scaled_fp8(pa, a, input_scale=0.5)
    write_scaled_fp8(pb, b)
    outs = []
    for cls in (DecodedSource, _NoRawAccess):
        out = tmp_path / f"{cls.__name__}.safetensors"
        execute_merge(plan_merge([cls(pa), cls(pb)], "weighted_sum", [0.3, 0.7]), out, "keep", chunk_elems=64)
        outs.append(out)
    with safe_open(str(outs[0]), "pt") as f, safe_open(str(outs[1]), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():
            x, y = f.get_tensor(k), g.get_tensor(k)
            assert x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), k
