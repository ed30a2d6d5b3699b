"""Quantized checkpoints against the real consumer: ComfyUI 0.3.75 loads the same files through
`comfy.sd.load_diffusion_model` (the UNETLoader path: its own scaled-fp8 / mixed-precision detection, ops
and state-dict loading), and the weights it computes equal what our decoded view reads. The nodes'
MODEL reader (`PatcherSource` / `effective_weight`) sees dequantized weights and no scale parameters.

The only change made to ComfyUI is the head count of the tiny Flux (ComfyUI hard-codes 24 heads, which a
hidden size of 64 cannot split); it does not touch any weight."""

from __future__ import annotations

import pytest
import torch
from comfy_support import import_pack

from weightsmith.encodings import testfiles as tf
from weightsmith.lora.formats import lora_state_dict
from weightsmith.sources import diffusion_view, open_model
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

pytestmark = pytest.mark.comfy
PREFIX = "diffusion_model."


@pytest.fixture(scope="module")
def tiny_flux_loader(comfy):
    """comfy.sd.load_diffusion_model for a narrow Flux (heads adjusted after ComfyUI's own detection)."""
    import comfy.model_detection as md

    original = md.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):
        cfg = original(state_dict, key_prefix, metadata=metadata)
        if cfg and cfg.get("image_model") == "flux" and cfg["hidden_size"] < 3072:
            head_dim = cfg["hidden_size"] // 2
            third = head_dim // 8 * 2
            cfg.update({"num_heads": 2, "axes_dim": [head_dim - 2 * third, third, third]})
        return cfg

    md.detect_unet_config = detect
    try:
        yield comfy.sd.load_diffusion_model
    finally:
        md.detect_unet_config = original


@pytest.fixture(scope="module")
def sd():
    return flux_state_dict(FluxConfig(), "dev", seed=0)


def comfy_weights(comfy, patcher) -> dict[str, torch.Tensor]:
    """Every parameter as ComfyUI computes the weight it uses (the layer's convert function applied)."""
    out = {}
    for k, entries in patcher.get_key_patches(PREFIX).items():
        w, convert = entries[0]
        out[k[len(PREFIX):]] = convert(comfy.model_management.cast_to_device(w, torch.device("cpu"), torch.float32,
                                                                             copy=True), inplace=True).float()
    return out


CASES = {
    "legacy e4m3fn scalar + scale_input": lambda sd: tf.scaled_fp8(sd, input_scale=True),
    "legacy e5m2 [1]": lambda sd: tf.scaled_fp8(sd, dtype=torch.float8_e5m2, kind="one"),
    "legacy checkpoint prefix": lambda sd: tf.scaled_fp8(sd, prefix="model.diffusion_model."),
    "mixed precision metadata + input_scale": lambda sd: tf.mixed_precision(sd, input_scale=True),
    "mixed precision, blocks only": lambda sd: tf.mixed_precision(sd, select=lambda k: "blocks" in k),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decoded_weights_equal_what_comfyui_loads(comfy, tiny_flux_loader, sd, tmp_path, case):
    enc = CASES[case](sd)
    path = enc.save(tmp_path / "q.safetensors")
    patcher = tiny_flux_loader(str(path))
    theirs = comfy_weights(comfy, patcher)
    ours = diffusion_view(open_model(path))
    scale_params = {k for k in theirs if k.endswith((".scale_weight", ".scale_input", ".input_scale"))}
    assert set(theirs) - scale_params == set(ours.keys())  # the same model, scales aside
    legacy = case.startswith("legacy")
    fp8 = torch.float8_e5m2 if "e5m2" in case else torch.float8_e4m3fn
    n_encoded = 0
    for k in ours.keys():
        mine = ours.get(k).float()
        if ours.encoding(k) is not None:
            n_encoded += 1
            assert torch.equal(theirs[k], mine), k  # dequantized bit for bit
        elif legacy and k.endswith(".bias") and ours.encoding(k[: -len(".bias")] + ".weight") is not None:
            # ComfyUI 0.3.75's scaled-fp8 Linear holds its bias in the fp8 dtype too: it rounds the file's bias
            assert torch.equal(theirs[k], mine.to(fp8).float()), k
        else:
            assert torch.equal(theirs[k], mine), k
    assert n_encoded == len(enc.layers) > 0


def test_comfyui_0375_cannot_load_per_row_or_block_scales_that_we_decode(comfy, tiny_flux_loader, sd, tmp_path):
    """Writers other than ComfyUI store [out, 1] or block scales: 0.3.75 refuses them (its scale_weight
    parameter is a scalar), we read them exactly. A scaled-fp8 output meant for ComfyUI needs scalar scales."""
    for kind in ("row", "block"):
        enc = tf.scaled_fp8(sd, kind=kind)
        path = enc.save(tmp_path / f"{kind}.safetensors")
        with pytest.raises(RuntimeError, match="size mismatch"):
            tiny_flux_loader(str(path))
        src = open_model(path)
        assert all(torch.equal(src.get(k), enc.dequantized[k]) for k in enc.layers)


@pytest.mark.parametrize("case", ["legacy e4m3fn scalar + scale_input", "mixed precision metadata + input_scale"])
def test_node_model_reader_sees_dequantized_weights_and_no_scales(comfy, tiny_flux_loader, sd, tmp_path, case):
    pack = import_pack()
    PatcherSource = pack.nodes.common.PatcherSource
    enc = CASES[case](sd)
    path = enc.save(tmp_path / "q.safetensors")
    patcher = tiny_flux_loader(str(path))
    if case.startswith("mixed"):
        # on a GPU ComfyUI's compute dtype is bf16 and QuantizedTensor.dequantize() would round to it:
        # the reader must dequantize in fp32 whatever the model's compute dtype
        for k in enc.layers:
            w = patcher.get_key_patches(PREFIX)[PREFIX + k][0][0]
            assert type(w).__name__ == "QuantizedTensor"
            w._layout_params["orig_dtype"] = torch.bfloat16
    src = PatcherSource(patcher)
    ours = open_model(path)
    assert set(src.keys()) == set(ours.keys())
    for k in enc.layers:
        assert src.info(k).dtype == torch.float32 or case.startswith("legacy")
        assert src.encoding(k).format == ours.encoding(k).format  # in-graph reports list decoded weights too
        assert torch.equal(src.get(k), enc.dequantized[k]), k
    assert all(src.encoding(k) is None for k in src.keys() if k not in enc.layers)


def test_in_graph_extract_from_scaled_fp8_model_equals_file_extract(comfy, tiny_flux_loader, sd, tmp_path):
    """The Extract LoRA node's reader on (base, scaled-fp8 tuned) MODELs gives the LoRA the file extract
    gives from the same files (weights; ComfyUI rounds the scaled layers' biases to fp8, so bias diffs are
    left out of the comparison)."""
    pack = import_pack()  # the pack's own core (the nodes import it as a subpackage of the pack)
    PatcherSource = pack.nodes.common.PatcherSource
    extract_lora = pack.core.lora.extract.extract_lora
    tuned = finetune(sd, seed=1, rank=4, scale=0.05, noise=0.01)
    base_enc, tuned_enc = tf.scaled_fp8(sd), tf.scaled_fp8(tuned)
    bp, tp = base_enc.save(tmp_path / "b.safetensors"), tuned_enc.save(tmp_path / "t.safetensors")
    in_graph, _ = extract_lora(PatcherSource(tiny_flux_loader(str(bp)), name="base"),
                               PatcherSource(tiny_flux_loader(str(tp)), name="tuned"), rank=8, method="exact",
                               dtype="fp32")
    files, _ = extract_lora(bp, tp, rank=8, method="exact", dtype="fp32")
    got = {k: v for k, v in lora_state_dict(in_graph, "comfy", torch.float32).items() if ".diff_b" not in k}
    want = {k: v for k, v in lora_state_dict(files, "comfy", torch.float32).items() if ".diff_b" not in k}
    assert got and set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("method,params", [("weighted_sum", ""), ("ties", "density=0.4")])
def test_merge_node_on_scaled_fp8_models_equals_file_merge(comfy, tiny_flux_loader, sd, tmp_path, method, params):
    """Merge Models on two scaled-fp8 MODELs: no scale parameter is planned or patched, the report lists
    the decoded weights, and each merged weight (as ComfyUI computes it from the patches) equals the file
    merge of the same files bit for bit."""
    from comfy_support import effective_weights
    from safetensors.torch import load_file

    from weightsmith.merge import merge

    pack = import_pack()
    node = pack.NODE_CLASS_MAPPINGS["WeightsmithMergeModels"]()
    tuned = finetune(sd, seed=1, rank=4, scale=0.05, noise=0.01)
    ea, eb = tf.scaled_fp8(sd, input_scale=True), tf.scaled_fp8(tuned, input_scale=True)
    pa, pb = ea.save(tmp_path / "a.safetensors"), eb.save(tmp_path / "b.safetensors")
    res = node.merge(tiny_flux_loader(str(pa)), tiny_flux_loader(str(pb)), method, "0.5, 0.5", "", params, "none",
                     "take", True)
    merged, text = res["result"][0], res["result"][1]
    assert not any(k.endswith((".scale_weight", ".scale_input")) for k in merged.patches)
    assert f"{len(ea.layers)} fp8 scaled (legacy)" in text
    merge([pa, pb], tmp_path / "m.safetensors", method, [0.5, 0.5], params=params or None, dtype="fp32")
    want = load_file(str(tmp_path / "m.safetensors"))
    got = effective_weights(merged, keys=set(ea.layers))
    assert set(got) == set(ea.layers)
    for k in ea.layers:
        assert torch.equal(got[k], want[k]), k
