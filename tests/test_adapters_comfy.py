"""LoKr (whole and decomposed factors), LoHa (with Tucker cores on convs), LoRA with DoRA or a Tucker core,
and full diffs, made by LyCORIS itself, for Flux (kohya and SimpleTuner namings) and SDXL: every
conversion loads in the real ComfyUI 0.3.75 with 0 unloaded keys and patches exactly the weights ComfyUI
patches from the original file; our own ΔW equals the producer's; naming that cannot carry a type is refused."""

from __future__ import annotations

import pytest
import torch
from adapter_support import lycoris_deltas, lycoris_network, module_tree, save_network
from comfy_support import apply_lora, effective_weights, flux_patcher, unet_patcher
from safetensors.torch import load_file

from weightsmith.errors import MismatchError
from weightsmith.lora import keymaps
from weightsmith.lora.formats import load_lora, lora_state_dict
from weightsmith.sdunet import sd_unet_state_dict
from weightsmith.testmodels import FluxConfig, flux_state_dict

pytestmark = pytest.mark.comfy
CFG = FluxConfig()
STRENGTH = 0.75

ALGOS = {
    "lokr-full": dict(algo="lokr", factor=8, full_matrix=True),
    "lokr-decomposed": dict(algo="lokr", factor=4, decompose_both=True, dim=2),
    "lokr-dora": dict(algo="lokr", factor=4, dora_wd=True),
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lora-dora": dict(algo="lora", dora_wd=True),
    "lora-dora-in": dict(algo="lora", dora_wd=True, wd_on_output=False),
    "locon-tucker": dict(algo="lora", use_tucker=True),
    "full": dict(algo="full"),
}


@pytest.fixture(scope="module")
def flux(comfy):
    sd = flux_state_dict(CFG, "dev", seed=4)
    return sd, flux_patcher(sd)


@pytest.fixture(scope="module")
def sdxl(comfy):
    sd = sd_unet_state_dict("sdxl", "tiny", seed=2)
    return sd, unet_patcher(sd, "sdxl")


def _flux_targets(key: str) -> bool:  # a mix of fused, plain and modulation layers (the tiny model is small)
    return any(p in key for p in ("img_attn.qkv", "txt_mlp.0", "linear1", "linear2", "img_in", "img_mod.lin"))


def _sd_targets(key: str) -> bool:  # convs (3x3 and 1x1) and attention linears
    return any(p in key for p in ("input_blocks.1.0.in_layers.2", "input_blocks.1.0.out_layers.3", "attn1.to_q",
                                  "attn2.to_k", "proj_in", "out.2"))


def comfy_weights(patcher, sd, strength=STRENGTH):
    clone, missing, refused = apply_lora(patcher, sd, strength)
    assert missing == [] and refused == [], (missing, refused)
    return effective_weights(clone)


def assert_same(got: dict, want: dict, base: dict):
    changed = [k for k in want if not torch.equal(want[k], base[k].float())]
    assert changed, "the original file patches nothing"
    for k in want:
        err = float((got[k] - want[k]).detach().abs().max())
        assert err <= 1e-5 * (1 + float(want[k].abs().max())), f"{k}: max error {err}"


def _kind_formats(lora) -> list[str]:
    """Writable namings for a LoRA read from kohya names: those that name every module whole."""
    return ["comfy", "kohya"]


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("arch", ["flux", "sdxl"])
def test_lycoris_file_converts_and_patches_like_the_original(tmp_path, flux, sdxl, arch, algo):
    base, patcher = flux if arch == "flux" else sdxl
    opts = dict(ALGOS[algo])
    tree = module_tree(base, _flux_targets if arch == "flux" else _sd_targets)
    net = lycoris_network(tree, "lora_unet", opts.pop("algo"), seed=hash(algo) % 1000, dim=opts.pop("dim", 4),
                          **opts)
    path = save_network(net, tmp_path / f"{arch}-{algo}.safetensors")
    original = load_file(path)
    want = comfy_weights(patcher, original)

    lora = load_lora(path, arch=arch)
    if arch == "sdxl":  # the tiny test UNet: its diffusers names (lycoris naming) follow its own layout
        lora.metadata[keymaps.SD_LAYOUT_META] = "sdxl/tiny"
    assert not lora.unknown_keys and len(lora.modules) == len(net.loras)
    kinds = {k for m in lora.modules.values() for k in m.types()}
    expected_kind = {"lokr-full": "lokr", "lokr-decomposed": "lokr", "lokr-dora": "lokr", "loha": "loha",
                     "loha-tucker": "loha", "full": "diff"}.get(algo, "lora")
    assert expected_kind in kinds and (("dora" in kinds) == ("dora" in algo))
    # our model of each module patches what ComfyUI patches from the original file
    for name, mod in lora.modules.items():
        key = keymaps.weight_key(name)
        got = mod.apply(base[key].float(), STRENGTH)
        torch.testing.assert_close(got, want[key], rtol=1e-5, atol=1e-5, msg=key)
    if "dora" not in algo and algo != "full":  # ... and our ΔW is the producer's own
        theirs = lycoris_deltas(net)
        for name, mod in lora.modules.items():
            key = keymaps.weight_key(name)
            lyc = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
            ours = mod.dense_delta(tuple(base[key].shape))
            torch.testing.assert_close(ours, theirs[lyc].reshape(ours.shape), rtol=1e-5, atol=1e-6, msg=key)

    for fmt in ("comfy", "kohya", "lycoris", "onetrainer"):
        try:
            sd = lora_state_dict(lora, fmt)
        except MismatchError as e:  # split names cannot carry an adapter on a whole fused weight
            assert arch == "flux" and fmt in ("lycoris", "onetrainer"), (fmt, e)
            assert any(m.adapters for m in lora.modules.values())
            assert "--to-type lora" in str(e) and "rows" in str(e)
            continue
        assert_same(comfy_weights(patcher, sd), want, base)
        again = load_lora(sd, arch=arch)  # the type survives the round trip
        assert {k for m in again.modules.values() for k in m.types()} == kinds, fmt
    if any(m.adapters for m in lora.modules.values()):
        with pytest.raises(MismatchError, match="diffusers format cannot carry"):
            lora_state_dict(lora, "diffusers")


@pytest.mark.parametrize("algo", ["lokr-full", "lokr-decomposed", "loha", "lora-dora"])
def test_simpletuner_lycoris_names_split_qkv(tmp_path, flux, algo):
    """SimpleTuner names Flux layers the diffusers way (`lycoris_transformer_blocks_0_attn_to_q`): adapters on
    row slices of the fused qkv / linear1. They convert to the namings that split the same way, exactly."""
    from weightsmith.testmodels import flux_diffusers_shapes

    base, patcher = flux
    opts = dict(ALGOS[algo])
    dshapes = flux_diffusers_shapes(CFG)
    keep = ("attn.to_q", "attn.to_k", "attn.add_v_proj", "proj_mlp", "ff.net.0.proj", "norm_out.linear")
    dbase = {k: torch.randn(s) for k, s in dshapes.items() if k.endswith(".weight") and any(p in k for p in keep)}
    net = lycoris_network(module_tree(dbase), "lycoris", opts.pop("algo"), seed=3, dim=opts.pop("dim", 4), **opts)
    path = save_network(net, tmp_path / f"st-{algo}.safetensors")
    original = load_file(path)
    if "dora" in algo:
        # a DoRA norm is per row of the slice ComfyUI patches; our model must narrow the same way
        pass
    want = comfy_weights(patcher, original)
    lora = load_lora(path)
    assert lora.source_format == "lycoris" and not lora.unknown_keys
    for name, mod in lora.modules.items():
        key = keymaps.weight_key(name)
        torch.testing.assert_close(mod.apply(base[key].float(), STRENGTH), want[key], rtol=1e-5, atol=1e-5, msg=key)
    for fmt in ("lycoris", "onetrainer"):
        assert_same(comfy_weights(patcher, lora_state_dict(lora, fmt)), want, base)
    with pytest.raises(MismatchError, match="rows"):
        lora_state_dict(lora, "comfy")
