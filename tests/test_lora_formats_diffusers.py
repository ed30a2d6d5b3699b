"""A diffusers-format Flux LoRA written by this project loads with diffusers' own
`FluxTransformer2DModel.load_lora_adapter` (PEFT) on a small random transformer, and the weights it
patches change by exactly the LoRA's ΔW (mapped to diffusers names: q/k/v slices, swapped norm_out).
Skipped only when diffusers/peft are not installed (they are test-only dependencies)."""

from __future__ import annotations

import pytest
import torch

from weightsmith.lora import keymaps
from weightsmith.lora.formats import load_lora, lora_state_dict, save_lora
from weightsmith.lora.testloras import random_lora
from weightsmith.testmodels import FluxConfig, flux_diffusers_shapes, flux_shapes

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

CFG = FluxConfig(depth=2, depth_single=2)


def tiny_transformer():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=CFG.in_channels, num_layers=CFG.depth, num_single_layers=CFG.depth_single,
        attention_head_dim=CFG.head_dim, num_attention_heads=CFG.num_heads, joint_attention_dim=CFG.context_in,
        pooled_projection_dim=CFG.vec_in, guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    # our diffusers key layout for this config is exactly the model's
    assert set(flux_diffusers_shapes(CFG)) == set(model.state_dict())
    return model


def expected_diffusers_deltas(lora) -> dict[str, torch.Tensor]:
    """ΔW per diffusers weight key, from the canonical (BFL) LoRA."""
    shapes = flux_shapes(CFG, "dev")
    out = {}
    for name, mod in lora.modules.items():
        bfl = name[len(keymaps.DIFFUSION):]
        full = mod.dense_delta(shapes[bfl + ".weight"])
        h = full.shape[1]
        for d, piece in keymaps.flux_to_diffusers(bfl):
            rows = full if piece.rows is None else full[piece.rows[0] * h : (piece.rows[0] + piece.rows[1]) * h]
            if piece.swap:
                a, b = rows.chunk(2)
                rows = torch.cat([b, a])
            out[d + ".weight"] = rows
    return out


@pytest.mark.parametrize("source_format", ["kohya", "diffusers"])
def test_diffusers_loads_our_flux_lora_with_exact_deltas(tmp_path, source_format):
    shapes = flux_shapes(CFG, "dev")
    # every linear (modulations, embedders and the swapped norm_out included), alpha != rank
    lora = random_lora(shapes, "flux", rank=4, seed=3, alpha=2.0, scale=0.1)
    if source_format == "kohya":  # also through a kohya file: kohya -> canonical -> diffusers
        lora = load_lora(save_lora(lora, tmp_path / "k.safetensors", fmt="kohya"))
    path = save_lora(lora, tmp_path / "d.safetensors", fmt="diffusers")

    from safetensors.torch import load_file

    sd = load_file(path)
    model = tiny_transformer()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_lora_adapter(sd, prefix="transformer", adapter_name="ws")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    after = model.state_dict()
    want = expected_diffusers_deltas(lora)
    assert len(want) == len(sd) // 2  # one lora_A/lora_B pair per diffusers module
    for key, w0 in before.items():
        delta = after[key] - w0
        if key in want:
            err = float((delta - want[key]).abs().max())
            assert err <= 1e-6 + 1e-4 * float(want[key].abs().max()), f"{key}: max error {err}"
        else:
            assert torch.equal(after[key], w0), key


def test_diffusers_trained_lora_reads_back_exactly():
    """diffusers' own saved adapter (get_peft_model_state_dict names) reads into the canonical LoRA."""
    from peft.utils import get_peft_model_state_dict

    lora = random_lora(flux_shapes(CFG, "dev"), "flux", rank=4, seed=4, alpha=4.0, scale=0.1)
    model = tiny_transformer()
    model.load_lora_adapter(lora_state_dict(lora, "diffusers"), prefix="transformer", adapter_name="ws")
    saved = {"transformer." + k: v for k, v in get_peft_model_state_dict(model, adapter_name="ws").items()}
    back = load_lora(saved)
    assert back.source_format == "diffusers" and not back.unknown_keys
    shapes = flux_shapes(CFG, "dev")
    for name, mod in lora.modules.items():
        key = name[len(keymaps.DIFFUSION):] + ".weight"
        torch.testing.assert_close(back.modules[name].dense_delta(shapes[key]), mod.dense_delta(shapes[key]))
