"""LoRA formats without ComfyUI: detection, every reader, exact round trips between every pair of writable
formats (Flux, Chroma, SD1.5), fused <-> split factor algebra, alpha conventions, unknown keys, errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from weightsmith.errors import BadFileError, MismatchError
from weightsmith.lora.factors import fuse_terms
from weightsmith.lora.formats import (
    WRITABLE_FORMATS,
    detect_format,
    load_lora,
    lora_state_dict,
    save_lora,
)
from weightsmith.lora.keymaps import dotted, flux_from_diffusers, flux_to_diffusers, weight_key
from weightsmith.lora.model import LoRA, LoraTerm, ModuleDelta
from weightsmith.lora.testloras import flux_attn_mlp, random_lora
from weightsmith.sdunet import sd_unet_shapes
from weightsmith.sources import DictSource
from weightsmith.testmodels import FluxConfig, flux_shapes

CFG = FluxConfig()
H = CFG.hidden
FLUX = flux_shapes(CFG, "dev")
CHROMA = flux_shapes(CFG, "chroma")
SD15 = sd_unet_shapes("sd15", "tiny")
SHAPES = {"flux": FLUX, "chroma": CHROMA, "sd15": SD15}


def deltas(lora: LoRA, shapes) -> dict[str, torch.Tensor]:
    """Dense ΔW (and Δbias) of every module, fp32."""
    out = {}
    for name, mod in lora.modules.items():
        key = weight_key(name)
        out[key] = mod.dense_delta(shapes[key])
        if mod.diff_b is not None:
            out[key[: -len(".weight")] + ".bias"] = mod.diff_b.float()
    return out


def assert_same_deltas(a: LoRA | dict, b: LoRA, shapes, atol=1e-7):
    da = a if isinstance(a, dict) else deltas(a, shapes)
    db = deltas(b, shapes)
    assert set(da) == set(db)
    for k in da:
        err = float((db[k] - da[k]).abs().max())
        assert err <= atol + 1e-5 * float(da[k].abs().max()), f"{k}: max error {err}"


_REFERENCE: dict[str, tuple[LoRA, dict]] = {}


def reference(arch: str) -> tuple[LoRA, dict]:
    """The sample LoRA of `arch` and its dense deltas, computed once per session."""
    if arch not in _REFERENCE:
        lora = sample_lora(arch)
        _REFERENCE[arch] = (lora, deltas(lora, SHAPES[arch]))
    return _REFERENCE[arch]


def everywhere_but_guidance(key: str) -> bool:
    return not key.startswith("distilled_guidance_layer.")


def sample_lora(arch: str, seed: int = 0) -> LoRA:
    """A LoRA every writable format can express: all 2-D weights (convs for SD); for Chroma not its
    distilled guidance layer, which only the comfy and kohya names reach in ComfyUI."""
    return random_lora(SHAPES[arch], arch, rank=4, seed=seed, targets=everywhere_but_guidance)


def as_file(sd: dict, lora: LoRA) -> DictSource:
    """A state dict with the metadata save_lora would write (the tiny SD UNet's layout travels there)."""
    return DictSource(sd, metadata={k: v for k, v in lora.metadata.items() if k.startswith("weightsmith.")})


@pytest.mark.parametrize("arch", ["flux", "chroma", "sd15"])
@pytest.mark.parametrize("src_fmt,dst_fmt", list(itertools.product(WRITABLE_FORMATS, repeat=2)))
def test_round_trip_every_pair_is_exact(arch, src_fmt, dst_fmt):
    lora, expected = reference(arch)
    sd1 = lora_state_dict(lora, src_fmt)
    a = load_lora(as_file(sd1, lora))
    if not (arch == "sd15" and src_fmt == "onetrainer"):
        assert detect_format(sd1) == src_fmt and a.source_format == src_fmt
    assert a.arch == arch and not a.unknown_keys
    sd2 = lora_state_dict(a, dst_fmt)
    b = load_lora(as_file(sd2, a))
    same_names = arch == "sd15" and dst_fmt == "onetrainer"  # OneTrainer names SD UNets the kohya way
    assert b.arch == arch and b.source_format == ("kohya" if same_names else dst_fmt) and not b.unknown_keys
    assert_same_deltas(expected, b, SHAPES[arch])


def test_comfy_and_kohya_keep_factors_alpha_and_bias_untouched():
    lora = random_lora(FLUX, "flux", rank=4, seed=3, with_bias=True, alpha=3.0)
    for fmt in ("comfy", "kohya"):
        back = load_lora(lora_state_dict(lora, fmt))
        for name, mod in lora.modules.items():
            got = back.modules[name]
            assert torch.equal(got.terms[0].up, mod.terms[0].up) and torch.equal(got.terms[0].down, mod.terms[0].down)
            assert got.terms[0].alpha == 3.0
            assert torch.equal(got.diff_b, mod.diff_b)


def test_alpha_conventions_per_format():
    lora = random_lora(FLUX, "flux", rank=4, seed=1, targets=["double_blocks.0.img_attn.proj.weight"], alpha=1.0)
    sd = {fmt: lora_state_dict(lora, fmt) for fmt in WRITABLE_FORMATS}
    assert float(sd["comfy"]["diffusion_model.double_blocks.0.img_attn.proj.alpha"]) == 1.0
    assert float(sd["kohya"]["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 1.0
    assert float(sd["onetrainer"]["lora_transformer_transformer_blocks_0_attn_to_out_0.alpha"]) == 1.0
    # diffusers/PEFT files carry no alpha: alpha / rank = 1/4 is baked into lora_B
    assert not any(k.endswith(".alpha") for k in sd["diffusers"])
    up = sd["diffusers"]["transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight"]
    torch.testing.assert_close(up, lora.modules["diffusion_model.double_blocks.0.img_attn.proj"].terms[0].up * 0.25)
    # a kohya file always names an alpha (rank when the LoRA has none, i.e. scale 1)
    plain = LoRA({"diffusion_model.img_in": ModuleDelta([LoraTerm(torch.ones(H, 2), torch.ones(2, 64))])}, arch="flux")
    assert float(lora_state_dict(plain, "kohya")["lora_unet_img_in.alpha"]) == 2.0
    assert "diffusion_model.img_in.alpha" not in lora_state_dict(plain, "comfy")


def test_split_qkv_with_equal_downs_fuses_to_a_shared_down():
    lora = random_lora(FLUX, "flux", rank=4, seed=2, targets=["double_blocks.0.img_attn.qkv.weight",
                                                              "single_blocks.0.linear1.weight"])
    split = load_lora(lora_state_dict(lora, "diffusers"))
    qkv = split.modules["diffusion_model.double_blocks.0.img_attn.qkv"]
    assert [t.rows for t in qkv.terms] == [(0, H), (H, H), (2 * H, H)]
    lin1 = split.modules["diffusion_model.single_blocks.0.linear1"]
    assert sorted(t.rows for t in lin1.terms) == [(0, H), (H, H), (2 * H, H), (3 * H, 4 * H)]
    fused = lora_state_dict(split, "comfy")
    # the three (four) diffusers downs are the same matrix: fused back at rank 4, not 12 / 16
    assert fused["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"].shape == (4, H)
    assert fused["diffusion_model.single_blocks.0.linear1.lora_down.weight"].shape == (4, H)
    assert_same_deltas(lora, load_lora(fused), FLUX)


def test_split_qkv_with_different_downs_fuses_block_diagonally():
    g = torch.Generator().manual_seed(0)
    terms = [LoraTerm(torch.randn(H, 2, generator=g), torch.randn(2, H, generator=g), alpha=a, rows=(i * H, H))
             for i, a in enumerate((1.0, 2.0, None))]
    lora = LoRA({"diffusion_model.double_blocks.0.txt_attn.qkv": ModuleDelta(terms)}, arch="flux")
    sd = lora_state_dict(lora, "kohya")
    down = sd["lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight"]
    up = sd["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"]
    assert down.shape == (6, H) and up.shape == (3 * H, 6)
    assert not up[:H, 2:].any() and not up[H : 2 * H, :2].any() and not up[H : 2 * H, 4:].any()  # block-diagonal
    assert_same_deltas(lora, load_lora(sd), FLUX)


def test_fuse_terms_keeps_a_common_scale_as_alpha():
    g = torch.Generator().manual_seed(1)
    terms = [LoraTerm(torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g), alpha=1.0, rows=(i * 4, 4))
             for i in range(2)]
    up, down, alpha = fuse_terms(terms, 8)
    assert down.shape == (4, 5) and alpha == 2.0  # alpha / rank = 0.5 as before, factors unscaled
    torch.testing.assert_close(up[:4, :2], terms[0].up)


def test_norm_out_scale_shift_halves_are_swapped():
    g = torch.Generator().manual_seed(4)
    up, down = torch.randn(2 * H, 3, generator=g), torch.randn(3, H, generator=g)
    name = "diffusion_model.final_layer.adaLN_modulation.1"
    lora = LoRA({name: ModuleDelta([LoraTerm(up, down)])}, arch="flux")
    sd = lora_state_dict(lora, "diffusers")
    b = sd["transformer.norm_out.linear.lora_B.weight"]
    torch.testing.assert_close(b[:H], up[H:])  # diffusers: scale | shift; BFL: shift | scale
    torch.testing.assert_close(b[H:], up[:H])
    assert_same_deltas(lora, load_lora(sd), FLUX)


def test_diffusers_names_map_both_ways():
    for bfl in [k[: -len(".weight")] for k in FLUX if k.endswith(".weight")]:
        for d, piece in flux_to_diffusers(bfl):
            assert flux_from_diffusers(d) == piece
    assert flux_from_diffusers("single_transformer_blocks.3.proj_mlp").rows == (3, 4)
    assert flux_from_diffusers("transformer_blocks.0.attn.add_k_proj").bfl == "double_blocks.0.txt_attn.qkv"
    assert dotted("single_transformer_blocks_0_attn_to_q") == "single_transformer_blocks.0.attn.to_q"
    assert dotted("final_layer_adaLN_modulation_1") == "final_layer.adaLN_modulation.1"
    assert dotted("time_in_in_layer") == "time_in.in_layer"
    assert dotted("text_model_encoder_layers_3_self_attn_out_proj") == "text_model.encoder.layers.3.self_attn.out_proj"


def test_xlabs_reader_maps_processor_keys():
    g = torch.Generator().manual_seed(5)
    sd = {}
    for proc, rows in (("qkv_lora1", 3 * H), ("qkv_lora2", 3 * H), ("proj_lora1", H), ("proj_lora2", H)):
        sd[f"double_blocks.0.processor.{proc}.down.weight"] = torch.randn(4, H, generator=g)
        sd[f"double_blocks.0.processor.{proc}.up.weight"] = torch.randn(rows, 4, generator=g)
    sd["single_blocks.0.processor.qkv_lora.down.weight"] = torch.randn(4, H, generator=g)
    sd["single_blocks.0.processor.qkv_lora.up.weight"] = torch.randn(3 * H, 4, generator=g)
    assert detect_format(sd) == "xlabs"
    lora = load_lora(sd)
    assert lora.arch == "flux" and not lora.unknown_keys
    assert set(lora.modules) == {f"diffusion_model.double_blocks.0.{m}" for m in
                                 ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj")} | {
        "diffusion_model.single_blocks.0.linear1"}
    lin1 = lora.modules["diffusion_model.single_blocks.0.linear1"].terms[0]
    assert lin1.rows == (0, 3 * H) and lin1.alpha is None
    txt = lora.modules["diffusion_model.double_blocks.0.txt_attn.qkv"].terms[0]
    assert torch.equal(txt.up, sd["double_blocks.0.processor.qkv_lora2.up.weight"])
    # and into a fused comfy file: linear1's mlp rows stay untouched
    comfy = lora_state_dict(lora, "comfy")
    up = comfy["diffusion_model.single_blocks.0.linear1.lora_up.weight"]
    assert up.shape == (7 * H, 4) and not up[3 * H :].any()


def test_bfl_control_reader():
    g = torch.Generator().manual_seed(6)
    sd = {
        "img_in.lora_A.weight": torch.randn(4, 2 * 64, generator=g), "img_in.lora_B.weight": torch.randn(H, 4, generator=g),
        "img_in.lora_B.bias": torch.randn(H, generator=g),
        "double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, H, generator=g),
        "double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(3 * H, 4, generator=g),
        "single_blocks.0.norm.key_norm.scale": torch.randn(CFG.head_dim, generator=g),
    }
    assert detect_format(sd) == "bfl_control"
    lora = load_lora(sd)
    assert not lora.unknown_keys
    assert torch.equal(lora.modules["diffusion_model.img_in"].diff_b, sd["img_in.lora_B.bias"])
    assert torch.equal(lora.modules["diffusion_model.single_blocks.0.norm.key_norm.scale"].set_weight,
                       sd["single_blocks.0.norm.key_norm.scale"])
    comfy = lora_state_dict(lora, "comfy")
    assert comfy["diffusion_model.img_in.reshape_weight"].tolist() == [H, 128]
    assert "diffusion_model.single_blocks.0.norm.key_norm.scale.set_weight" in comfy
    assert "diffusion_model.img_in.diff_b" in comfy


def test_peft_bfl_reader():
    lora = random_lora(FLUX, "flux", rank=2, seed=7, targets=flux_attn_mlp, alpha=None)
    comfy = lora_state_dict(lora, "comfy")
    peft = {}
    for k, v in comfy.items():
        k = k.replace("diffusion_model.", "base_model.model.").replace("lora_up", "lora_B").replace("lora_down", "lora_A")
        peft[k] = v
    assert detect_format(peft) == "peft_bfl"
    back = load_lora(peft)
    assert back.source_format == "peft_bfl" and not back.unknown_keys
    assert_same_deltas(lora, back, FLUX)


def test_unknown_keys_are_reported_never_dropped():
    lora = random_lora(FLUX, "flux", rank=2, seed=8, targets=["img_in.weight"])
    sd = lora_state_dict(lora, "kohya")
    sd["lora_unet_not_a_layer.lora_up.weight"] = torch.ones(2, 2)
    sd["lora_unet_not_a_layer.lora_down.weight"] = torch.ones(2, 2)
    sd["lora_unet_double_blocks_0_img_attn_qkv.oft_blocks"] = torch.ones(2, 2)
    sd["lora_unet_txt_in.dora_scale"] = torch.ones(H)  # a magnitude with no adapter: ComfyUI uses it nowhere
    back = load_lora(sd)
    assert sorted(back.unknown_keys) == sorted([
        "lora_unet_not_a_layer.lora_up.weight", "lora_unet_not_a_layer.lora_down.weight",
        "lora_unet_double_blocks_0_img_attn_qkv.oft_blocks", "lora_unet_txt_in.dora_scale"])
    assert list(back.modules) == ["diffusion_model.img_in"]
    # half a LoKr (lokr_w1 without lokr_w2) is a damaged file, said with the module
    sd["lora_unet_double_blocks_0_img_attn_qkv.lokr_w1"] = torch.ones(2, 2)
    with pytest.raises(BadFileError, match="lora_unet_double_blocks_0_img_attn_qkv.*lokr_w2"):
        load_lora(sd)


def test_mixed_spellings_in_one_file_are_all_read():
    lora = random_lora(FLUX, "flux", rank=2, seed=9, targets=["img_in.weight", "txt_in.weight"])
    kohya = lora_state_dict(LoRA({"diffusion_model.img_in": lora.modules["diffusion_model.img_in"]}, arch="flux"), "kohya")
    diff = lora_state_dict(LoRA({"diffusion_model.txt_in": lora.modules["diffusion_model.txt_in"]}, arch="flux"),
                           "diffusers")
    back = load_lora({**kohya, **diff})
    assert not back.unknown_keys and set(back.modules) == set(lora.modules)
    assert_same_deltas(lora, back, FLUX)


def test_text_encoder_modules_round_trip():
    g = torch.Generator().manual_seed(10)
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    t5 = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q"
    lora = random_lora(FLUX, "flux", rank=2, seed=9, targets=["img_in.weight"])
    lora.modules[te] = ModuleDelta([LoraTerm(torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g), alpha=1.0)])
    lora.modules[t5] = ModuleDelta([LoraTerm(torch.randn(8, 2, generator=g), torch.randn(2, 8, generator=g))])
    kohya = lora_state_dict(lora, "kohya")
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    assert "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight" in kohya
    with pytest.raises(MismatchError, match="t5xxl"):  # ComfyUI maps no diffusers T5 names
        lora_state_dict(lora, "diffusers")
    t5_delta = lora.modules.pop(t5)
    diffusers = lora_state_dict(lora, "diffusers")
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in diffusers
    lora.modules[t5] = t5_delta
    for sd in (kohya, diffusers, lora_state_dict(lora, "comfy")):
        back = load_lora(sd)
        assert set(back.modules) <= set(lora.modules) and not back.unknown_keys
        for name in back.modules:
            shape = (H, 64) if name == "diffusion_model.img_in" else (8, 8)
            torch.testing.assert_close(back.modules[name].dense_delta(shape), lora.modules[name].dense_delta(shape))
    # diffusers-trained T5 adapters (text_encoder_2 on Flux) are still read
    t5_file = {"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": torch.ones(2, 8),
               "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.ones(8, 2)}
    assert list(load_lora(t5_file).modules) == [t5]


def test_formats_that_cannot_name_a_module_refuse_clearly():
    g = torch.Generator().manual_seed(11)
    norm = "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale"
    lora = LoRA({norm: ModuleDelta(diff=torch.randn(CFG.head_dim, generator=g))}, arch="flux")
    with pytest.raises(MismatchError, match=r"kohya format cannot hold 1 module.*query_norm\.scale \(no kohya name\)"):
        lora_state_dict(lora, "kohya")
    assert load_lora(lora_state_dict(lora, "diffusers")).modules[norm].diff is not None  # attn.norm_q.diff
    qkv_bias = LoRA({"diffusion_model.double_blocks.0.img_attn.qkv": ModuleDelta(
        diff_b=torch.randn(3 * H, generator=g))}, arch="flux")
    with pytest.raises(MismatchError, match="bias change"):
        lora_state_dict(qkv_bias, "diffusers")
    with pytest.raises(MismatchError, match="cannot write LoRA format 'xlabs'"):
        lora_state_dict(qkv_bias, "xlabs")


def test_chroma_guidance_layer_only_in_comfy_and_kohya_names():
    lora = random_lora(CHROMA, "chroma", rank=2, seed=12, targets=lambda k: k.startswith("distilled_guidance_layer."))
    for fmt in ("comfy", "kohya"):
        back = load_lora(lora_state_dict(lora, fmt))
        assert back.arch == "chroma" and set(back.modules) == set(lora.modules)
    for fmt in ("diffusers", "onetrainer"):
        with pytest.raises(MismatchError, match="distilled_guidance_layer"):
            lora_state_dict(lora, fmt)
    # diffusers-trained Chroma LoRAs (ChromaTransformer2DModel names) are read
    d = {"transformer.distilled_guidance_layer.layers.0.linear_1.lora_A.weight": torch.ones(2, 32),
         "transformer.distilled_guidance_layer.layers.0.linear_1.lora_B.weight": torch.ones(32, 2)}
    assert list(load_lora(d).modules) == ["diffusion_model.distilled_guidance_layer.layers.0.in_layer"]


def test_arch_detection_and_wrong_arch_errors(tmp_path):
    assert load_lora(lora_state_dict(random_lora(CHROMA, "chroma", rank=2), "kohya")).arch == "chroma"
    plain = random_lora(FLUX, "flux", rank=2, targets=flux_attn_mlp)
    assert load_lora(lora_state_dict(plain, "comfy")).arch == "flux"
    assert load_lora(lora_state_dict(plain, "comfy"), arch="chroma").arch == "chroma"  # shared layers only
    with pytest.raises(MismatchError, match="Chroma does not have"):
        load_lora(lora_state_dict(sample_lora("flux"), "comfy"), arch="chroma")
    with pytest.raises(MismatchError, match="an SD1.5 LoRA, not a Flux"):
        load_lora(lora_state_dict(sample_lora("sd15"), "kohya"), arch="flux")
    model = tmp_path / "model.safetensors"
    from weightsmith.testmodels import write_model
    write_model(model, FLUX, seed=0)
    with pytest.raises(BadFileError, match="full flux-dev model, not a LoRA"):
        load_lora(model)


def test_save_lora_writes_metadata_and_protects_inputs(tmp_path):
    lora = sample_lora("flux")
    src = save_lora(lora, tmp_path / "a.safetensors", fmt="kohya", dtype=torch.bfloat16, metadata={"note": "x"})
    back = load_lora(src)
    assert back.metadata["weightsmith.format"] == "kohya" and back.metadata["weightsmith.arch"] == "flux"
    assert back.metadata["note"] == "x"
    assert all(t.up.dtype == torch.bfloat16 for m in back.modules.values() for t in m.terms)
    with pytest.raises(Exception, match="one of the inputs"):
        save_lora(back, src, protect=[src], overwrite=True)
    with pytest.raises(Exception, match="refusing to overwrite"):
        save_lora(back, src)


def test_sd15_kohya_uses_diffusers_names_and_reads_ldm_names():
    lora, expected = reference("sd15")
    sd = lora_state_dict(lora, "kohya")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight" in sd
    ldm = {k.replace("lora_unet_down_blocks_0_attentions_0_", "lora_unet_input_blocks_1_1_"): v for k, v in sd.items()}
    back = load_lora(as_file(ldm, lora))
    assert not back.unknown_keys
    assert_same_deltas(expected, back, SD15)
    conv = back.modules["diffusion_model.input_blocks.1.0.in_layers.2"].terms[0]
    assert conv.down.shape == (4, 320, 3, 3) and conv.up.shape == (320, 4, 1, 1)


def test_demo_loras(tmp_path):
    from weightsmith.lora.testloras import DEMO_LORAS, make_demo_loras

    paths = make_demo_loras(tmp_path)
    assert [p.name for p in paths] == list(DEMO_LORAS)
    got = {p.name: load_lora(p) for p in paths}
    assert (got["flux-kohya-r8.safetensors"].source_format, got["flux-kohya-r8.safetensors"].arch) == ("kohya", "flux")
    assert any("img_mod" in n for n in got["flux-kohya-r8.safetensors"].modules)  # modulations included
    assert got["flux-diffusers-r4.safetensors"].source_format == "diffusers"
    assert (got["sd15-kohya-r4.safetensors"].arch, got["sd15-kohya-r4.safetensors"].metadata["weightsmith.sd_layout"]) == (
        "sd15", "sd15/tiny")
    before = {p: p.stat().st_mtime_ns for p in paths}
    make_demo_loras(tmp_path)  # existing files are kept
    assert {p: p.stat().st_mtime_ns for p in paths} == before
