"""Quantized checkpoints (issue 14, the reading side): ComfyUI legacy scaled fp8, ComfyUI mixed precision
(metadata and `comfy_quant` forms) and diffusers-style fp8 decode to exactly the weights their writer
quantized (the truth `core.encodings.testfiles` computes at generation time with its own broadcasting),
scale tensors are never keys, and merge / extract / mix / inspect on quantized files equal the same work
on the dequantized models. What cannot be decoded is refused naming file, layer and format."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.encodings import DecodedSource, decode_source
from weightsmith.encodings import testfiles as tf
from weightsmith.errors import UnsupportedEncodingError
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import lora_state_dict
from weightsmith.lora.testloras import random_lora
from weightsmith.merge import merge
from weightsmith.mix import lossless_mix
from weightsmith.sources import SafetensorsSource, diffusion_view, open_model
from weightsmith.testmodels import FluxConfig, finetune, flux_shapes, flux_state_dict

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


@pytest.fixture(scope="module")
def pair():
    base = flux_state_dict(FluxConfig(), "dev", seed=0)
    return base, finetune(base, seed=1, rank=4, scale=0.05, noise=0.01)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "weightsmith", *map(str, args)], capture_output=True, text=True)


# --- decoding ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("kind", tf.SCALE_KINDS)
def test_scaled_fp8_decodes_every_scale_layout(pair, tmp_path, dtype, kind):
    enc = tf.scaled_fp8(pair[0], dtype=dtype, kind=kind, input_scale=kind == "tensor")
    src = open_model(enc.save(tmp_path / "m.safetensors"))
    assert isinstance(src, DecodedSource)
    assert set(src.keys()) == set(pair[0])  # no scale_weight, scale_input or scaled_fp8 key
    for k in enc.layers:
        e = src.encoding(k)
        assert (e.format, e.stored_dtype, e.stored_shape) == ("fp8_scaled", dtype, tuple(pair[0][k].shape))
        assert e.side["marker"] == "scaled_fp8"
        assert src.info(k).dtype == torch.float32 and src.info(k).shape == tuple(pair[0][k].shape)
        assert torch.equal(src.get(k), enc.dequantized[k]), k
        if kind == "tensor":
            assert torch.equal(src.side_tensor(e.side["input_scale"]), enc.tensors[e.side["input_scale"]])
    plain = [k for k in src.keys() if k not in enc.layers]
    assert plain and all(src.encoding(k) is None and torch.equal(src.get(k), pair[0][k]) for k in plain)
    name = "e4m3fn" if dtype == E4M3 else "e5m2"
    assert src.encodings_summary()[f"fp8 scaled (legacy) {name}"] == len(enc.layers)


@pytest.mark.parametrize("form", ["metadata", "tensor"])
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
def test_mixed_precision_decodes_both_forms(pair, tmp_path, form, fmt):
    # a full checkpoint: metadata layer names leave out `model.diffusion_model.` (ComfyUI strips it first)
    def select(k: str) -> bool:  # mixed: only the blocks are quantized
        return "blocks" in k

    enc = tf.mixed_precision(pair[0], form=form, fmt=fmt, input_scale=True, prefix="model.diffusion_model.",
                             select=select)
    src = open_model(enc.save(tmp_path / "m.safetensors"))
    assert "_quantization_metadata" not in src.metadata  # the view is plain: its metadata must not claim layers
    assert "_quantization_metadata" in src.raw.metadata or form == "tensor"
    view = diffusion_view(src)
    assert set(view.keys()) == set(pair[0])
    assert 0 < len(enc.layers) < len([k for k in pair[0] if k.endswith(".weight")])
    for k in enc.layers:
        short = k[len("model.diffusion_model."):]
        e = view.encoding(short)  # PrefixView forwards to the decoded source
        assert e.format == f"comfy_quant:{fmt}" and e.label == f"comfy mixed precision {fmt}"
        assert "input_scale" in e.side and (("comfy_quant" in e.side) == (form == "tensor"))
        assert torch.equal(view.get(short), enc.dequantized[k])
        assert view.side_tensor(e.side["input_scale"]).ndim == 0
    assert all(view.encoding(k) is None for k in view.keys() if not select(k))


def test_diffusers_fp8_decodes_per_tensor_and_per_row(pair, tmp_path):
    for kind in ("tensor", "row"):
        enc = tf.diffusers_fp8(pair[0], kind=kind)
        src = open_model(enc.save(tmp_path / f"{kind}.safetensors"))
        assert set(src.keys()) == set(pair[0])
        for k in enc.layers:
            assert src.encoding(k).format == "diffusers_fp8"
            assert torch.equal(src.get(k), enc.dequantized[k])


def test_plain_files_and_loras_pass_through_untouched(pair, tmp_path):
    save_file(pair[0], tmp_path / "plain.safetensors")
    assert type(open_model(tmp_path / "plain.safetensors")) is SafetensorsSource
    lora = random_lora(flux_shapes(FluxConfig()), "flux", rank=4)
    for fmt in ("comfy", "kohya", "diffusers"):
        save_file({k: v.clone() for k, v in lora_state_dict(lora, fmt).items()}, tmp_path / f"{fmt}.safetensors")
        raw = SafetensorsSource([tmp_path / f"{fmt}.safetensors"])
        assert decode_source(raw) is raw
    # plain fp8 (no scales at all, e.g. flux1-dev-fp8): plain keys in their stored dtype
    save_file({k: v.to(E4M3) for k, v in pair[0].items()}, tmp_path / "fp8.safetensors")
    src = open_model(tmp_path / "fp8.safetensors")
    assert type(src) is SafetensorsSource and src.encodings_summary() == {"plain fp8_e4m3fn": len(pair[0])}


def test_decoded_values_are_checked_for_nan(pair, tmp_path):
    enc = tf.scaled_fp8(pair[0])
    bad = next(iter(enc.layers))
    enc.tensors[bad[: -len(".weight")] + ".scale_weight"] = torch.tensor(float("inf"))
    src = open_model(enc.save(tmp_path / "m.safetensors"))
    src.get(bad)
    assert src.nonfinite_keys == [bad]
    with pytest.raises(Exception, match="NaN or Inf"):
        open_model(tmp_path / "m.safetensors", nonfinite="error").get(bad)


# --- refusals --------------------------------------------------------------------------------------------


def _unsupported_files(pair) -> dict[str, tuple[dict, dict, str]]:
    """name -> (tensors, metadata, format words the message must contain), each naming layer img_in."""
    w = pair[0]["img_in.weight"]
    base = {k: v for k, v in pair[0].items() if k != "img_in.weight"}
    nvfp4 = tf.mixed_precision({"img_in.weight": w}, form="tensor")
    nvfp4.tensors["img_in.comfy_quant"] = tf.config_tensor({"format": "nvfp4"})
    mx = tf.mixed_precision({"img_in.weight": w}, form="metadata")
    mx.metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": {"img_in": {"format": "mxfp8"}}})
    odd = tf.scaled_fp8({"img_in.weight": w})
    odd.tensors["img_in.scale_weight"] = torch.ones(3, 5)
    return {
        "nunchaku": ({**base, "img_in.qweight": torch.zeros(64, 32, dtype=torch.int8),
                      "img_in.wscales": torch.ones(4, 64, dtype=torch.bfloat16)}, {}, "nunchaku SVDQuant"),
        "bitsandbytes": ({**base, "img_in.weight": torch.zeros(2048, 1, dtype=torch.uint8),
                          "img_in.weight.absmax": torch.ones(64), "img_in.weight.quant_map": torch.ones(16)}, {},
                         "bitsandbytes 4-bit"),
        "nvfp4": ({**base, **nvfp4.tensors}, {}, "'nvfp4'"),
        "mxfp8": ({**base, **mx.tensors}, mx.metadata, "'mxfp8'"),
        "int8": ({**base, "img_in.weight": torch.zeros(64, 64, dtype=torch.int8),
                  "img_in.weight_scale": torch.ones(())}, {}, "int8"),
        "odd scale": ({**base, **odd.tensors}, {}, "fp8 scaled (legacy)"),
    }


def test_unsupported_encodings_are_refused_naming_file_layer_format(pair, tmp_path):
    for name, (tensors, meta, words) in _unsupported_files(pair).items():
        path = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        save_file(tensors, path, metadata=meta or None)
        with pytest.raises(UnsupportedEncodingError) as e:
            open_model(path)
        msg = str(e.value)
        assert str(path) in msg and "'img_in'" in msg and words in msg, (name, msg)


def test_cli_refuses_unsupported_encoding_and_writes_nothing(pair, tmp_path):
    tensors, meta, _ = _unsupported_files(pair)["nvfp4"]
    save_file(tensors, tmp_path / "q.safetensors")
    save_file(pair[0], tmp_path / "plain.safetensors")
    out = tmp_path / "out.safetensors"
    r = run_cli("merge", tmp_path / "plain.safetensors", tmp_path / "q.safetensors", "-o", out)
    assert r.returncode == 2 and "nvfp4" in r.stderr and "img_in" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plain.safetensors", "q.safetensors"]


# --- capabilities on decoded values ------------------------------------------------------------------------


def _merged(paths, out, **kw) -> dict[str, torch.Tensor]:
    merge(paths, out, "weighted_sum", [0.5, 0.5], **kw)
    return load_file(str(out))


ENCODERS = {
    "legacy": lambda sd: tf.scaled_fp8(sd),
    "legacy-e5m2-block": lambda sd: tf.scaled_fp8(sd, dtype=E5M2, kind="block", input_scale=True),
    "mixed-metadata": lambda sd: tf.mixed_precision(sd, form="metadata", input_scale=True),
    "mixed-tensor": lambda sd: tf.mixed_precision(sd, form="tensor"),
}


@pytest.mark.parametrize("encoding", list(ENCODERS))
def test_merge_of_quantized_pair_equals_merge_of_dequantized(pair, tmp_path, encoding):
    ea, eb = ENCODERS[encoding](pair[0]), ENCODERS[encoding](pair[1])
    qa, qb = ea.save(tmp_path / "a.safetensors"), eb.save(tmp_path / "b.safetensors")
    save_file(ea.plain(), tmp_path / "da.safetensors")
    save_file(eb.plain(), tmp_path / "db.safetensors")
    got = _merged([qa, qb], tmp_path / "q.safetensors", dtype="bf16")
    want = _merged([tmp_path / "da.safetensors", tmp_path / "db.safetensors"], tmp_path / "d.safetensors", dtype="bf16")
    assert set(got) == set(pair[0])  # no scale tensor merged or written as a weight
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # and that is the exact average of the dequantized weights, rounded once to bf16
    k = ea.layers[0]
    assert torch.equal(got[k], ((ea.dequantized[k] + eb.dequantized[k]) * 0.5).to(torch.bfloat16))


def test_merge_bf16_with_scaled_fp8_lines_up_and_reports_decoding(pair, tmp_path):
    save_file({k: v.to(torch.bfloat16) for k, v in pair[0].items()}, tmp_path / "a.safetensors")
    eb = tf.scaled_fp8(pair[1], input_scale=True)
    eb.save(tmp_path / "b.safetensors")
    report = merge([tmp_path / "a.safetensors", tmp_path / "b.safetensors"], tmp_path / "m.safetensors",
                   "weighted_sum", [0.5, 0.5], dtype="bf16")
    d = report.to_dict()
    assert d["plan"]["only_in"] == {} and d["keys"]["merged"] == len(pair[0])
    dec = d["decoded"]
    assert list(dec) == ["B"] and dec["B"]["fp8 scaled (legacy) e4m3fn"]["count"] == len(eb.layers)
    assert set(dec["B"]["fp8 scaled (legacy) e4m3fn"]["keys"]) == set(eb.layers)
    assert "decoded from quantized storage" in report.table()
    got = load_file(str(tmp_path / "m.safetensors"))
    k = eb.layers[0]
    want = (pair[0][k].to(torch.bfloat16).float() * 0.5 + eb.dequantized[k] * 0.5).to(torch.bfloat16)
    assert torch.equal(got[k], want)


def test_merge_keep_writes_decoded_keys_as_fp32(pair, tmp_path):
    # until scaled-fp8 output exists, `keep` keeps the decoded (fp32) values rather than a payload without scale
    qa, qb = tf.scaled_fp8(pair[0]).save(tmp_path / "a.safetensors"), tf.scaled_fp8(pair[1]).save(tmp_path / "b.safetensors")
    got = _merged([qa, qb], tmp_path / "m.safetensors")
    assert "scaled_fp8" not in got and not any(k.endswith(".scale_weight") for k in got)
    assert got["img_in.weight"].dtype == torch.float32 and got["img_in.bias"].dtype == torch.float32


def _lora_tensors(lora) -> dict[str, torch.Tensor]:
    return lora_state_dict(lora, "comfy", torch.float32)


@pytest.mark.parametrize("both", [False, True])
def test_extract_from_quantized_equals_extract_from_dequantized(pair, tmp_path, both):
    base = {k: v.to(torch.bfloat16) for k, v in pair[0].items()}
    et = tf.scaled_fp8(pair[1], input_scale=True)
    tuned = et.save(tmp_path / "t.safetensors")
    save_file(et.plain(), tmp_path / "td.safetensors")
    if both:
        eb = tf.scaled_fp8(base)
        base_path = eb.save(tmp_path / "b.safetensors")
        save_file(eb.plain(), tmp_path / "bd.safetensors")
        base_deq = tmp_path / "bd.safetensors"
    else:
        save_file(base, tmp_path / "b.safetensors")
        base_path = base_deq = tmp_path / "b.safetensors"
    lora_q, rep_q = extract_lora(base_path, tuned, rank=8, method="exact", dtype="fp32")
    lora_d, rep_d = extract_lora(base_deq, tmp_path / "td.safetensors", rank=8, method="exact", dtype="fp32")
    got, want = _lora_tensors(lora_q), _lora_tensors(lora_d)
    assert got and set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert rep_q.summary()["error_global"] == rep_d.summary()["error_global"]
    dec = rep_q.to_dict()["decoded"]
    assert dec["tuned"]["fp8 scaled (legacy) e4m3fn"]["count"] == len(et.layers)
    assert ("base" in dec) == both and "decoded from quantized storage" in rep_q.text()


def test_mix_compares_decoded_values(pair, tmp_path):
    a = {k: v.to(torch.bfloat16) for k, v in pair[0].items()}
    eb = tf.scaled_fp8(pair[1], kind="row")
    ec = tf.mixed_precision(finetune(pair[0], seed=5, rank=2, scale=0.05, noise=0.01), form="tensor")
    save_file(a, tmp_path / "a.safetensors")
    eb.save(tmp_path / "b.safetensors")
    ec.save(tmp_path / "c.safetensors")
    rep = lossless_mix(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors",
                       out=tmp_path / "q.safetensors")
    lossless_mix(a, eb.plain(), ec.plain(), out=tmp_path / "d.safetensors")
    got, want = load_file(str(tmp_path / "q.safetensors")), load_file(str(tmp_path / "d.safetensors"))
    assert set(got) == set(a)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    k = eb.layers[0]  # every element is b's or c's decoded value, and both supplied some
    b, c = eb.dequantized[k], ec.dequantized[k]
    assert bool(((got[k] == b) | (got[k] == c)).all()) and bool((got[k] == b).any()) and bool((got[k] == c).any())
    j = rep.to_json()
    assert j["decoded"]["b"]["fp8 scaled (legacy) e4m3fn"]["count"] == len(eb.layers)
    assert j["decoded"]["c"]["comfy mixed precision float8_e4m3fn"]["count"] == len(ec.layers)
    assert "decoded" in j["lossless_means"] and "decoded (dequantized) values" in rep.text()


def test_cli_on_scaled_fp8_files(pair, tmp_path):
    """The issue's crashes: extract and mix on two scaled-fp8 files, inspect naming the encoding."""
    for name, sd in (("a", pair[0]), ("b", pair[1]), ("c", finetune(pair[0], seed=7))):
        tf.scaled_fp8(sd, prefix="model.diffusion_model.").save(tmp_path / f"{name}.safetensors")
    f = [tmp_path / f"{n}.safetensors" for n in "abc"]
    r = run_cli("extract", f[0], f[1], "-o", tmp_path / "l.safetensors", "--rank", "4")
    assert r.returncode == 0, r.stderr
    r = run_cli("mix", *f, "-o", tmp_path / "x.safetensors")
    assert r.returncode == 0, r.stderr
    r = run_cli("inspect", f[0], "--json", tmp_path / "i.json")
    assert r.returncode == 0, r.stderr
    n = len([k for k, v in pair[0].items() if tf.quantizable(k, v)])
    assert f"fp8 scaled (legacy) e4m3fn ({n} layers)" in r.stdout
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["arch"] == "flux-dev" and data["dtypes"]["fp8_e4m3fn"] == n


def test_sd15_scaled_fp8_merge_equals_merge_of_dequantized(tmp_path):
    from weightsmith.sdunet import sd_unet_state_dict

    a = sd_unet_state_dict("sd15", "tiny", seed=0)
    b = finetune(a, seed=3, rank=2, scale=0.05)
    ea, eb = tf.scaled_fp8(a, input_scale=True), tf.mixed_precision(b, form="tensor")
    assert ea.layers and all(a[k].ndim == 2 for k in ea.layers)  # attention/projection Linears; convs stay plain
    got = _merged([ea.save(tmp_path / "a.safetensors"), eb.save(tmp_path / "b.safetensors")], tmp_path / "q.safetensors",
                  dtype="bf16")
    want = _merged([ea.plain(), eb.plain()], tmp_path / "d.safetensors", dtype="bf16")
    assert set(got) == set(a)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_quantized_only_dtypes_name_the_format(tmp_path):
    """F8_E8M0 (MXFP8 block scales) and F4 payloads cannot be held by torch: the header refusal says what
    they are rather than only 'unsupported dtype'."""
    import struct

    for code, words in (("F8_E8M0", "mxfp8"), ("F4", "nvfp4")):
        header = json.dumps({"img_in.weight_scale": {"dtype": code, "shape": [2], "data_offsets": [0, 2]}}).encode()
        path = tmp_path / f"{code}.safetensors"
        path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
        with pytest.raises(UnsupportedEncodingError) as e:
            open_model(path)
        assert str(path) in str(e.value) and "img_in.weight_scale" in str(e.value) and words in str(e.value)


def test_checkpoint_with_scaled_fp8_text_encoder_shows_encoding_per_part(pair, tmp_path):
    """A full checkpoint: plain bf16 diffusion model, a t5 text encoder in scaled fp8 under its own marker
    (`text_encoders.t5xxl.transformer.scaled_fp8`, as ComfyUI's t5xxl_fp8_e4m3fn_scaled)."""
    te = {f"encoder.block.{i}.layer.0.SelfAttention.{p}.weight": torch.randn(32, 32) for i in range(2) for p in "qkvo"}
    enc = tf.scaled_fp8(te, prefix="text_encoders.t5xxl.transformer.")
    unet = {"model.diffusion_model." + k: v.to(torch.bfloat16) for k, v in pair[0].items()}
    save_file({**unet, **enc.tensors}, tmp_path / "ckpt.safetensors")
    src = open_model(tmp_path / "ckpt.safetensors")
    assert set(src.keys()) == set(unet) | set(enc.layers)
    assert all(src.encoding(k).side["marker"] == "text_encoders.t5xxl.transformer.scaled_fp8" for k in enc.layers)
    assert all(torch.equal(src.get(k), enc.dequantized[k]) for k in enc.layers)
    r = run_cli("inspect", tmp_path / "ckpt.safetensors")
    assert r.returncode == 0, r.stderr
    assert "encoding of te: fp8 scaled (legacy) e4m3fn (8 layers)" in r.stdout and "encoding of unet" not in r.stdout
