"""PEFT `lora_adapter_metadata` (lora_alpha = 2r, rank_pattern, alpha_pattern) in a file made by real PEFT +
diffusers: converted to comfy / kohya / onetrainer it patches in ComfyUI what diffusers applies from the
original; every diffusers output (converted, re-ranked, composed) loads in diffusers with the weights we
intend, with fresh metadata (never the input's)."""

from __future__ import annotations

import json

import pytest
import torch
from comfy_support import apply_lora, effective_weights, flux_patcher

from weightsmith.lora import keymaps
from weightsmith.lora.compose import compose_loras, rerank_lora
from weightsmith.lora.formats import load_lora, lora_state_dict, save_lora
from weightsmith.testmodels import FluxConfig, flux_state_dict

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.comfy
CFG = FluxConfig(depth=2, depth_single=2)
R = 4


def tiny_transformer():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=CFG.in_channels, num_layers=CFG.depth, num_single_layers=CFG.depth_single,
        attention_head_dim=CFG.head_dim, num_attention_heads=CFG.num_heads, joint_attention_dim=CFG.context_in,
        pooled_projection_dim=CFG.vec_in, guidance_embeds=True, axes_dims_rope=(8, 12, 12))


def diffusers_deltas(path) -> dict[str, torch.Tensor]:
    model = tiny_transformer()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    from diffusers.utils.state_dict_utils import _load_sft_state_dict_metadata
    from safetensors.torch import load_file

    # as a pipeline's load_lora_weights does: the file's lora_adapter_metadata goes with its tensors
    model.load_lora_adapter(load_file(path), prefix="transformer", adapter_name="x",
                            metadata=_load_sft_state_dict_metadata(str(path)))
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    return {k: v - before[k] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


@pytest.fixture(scope="module")
def peft_file(tmp_path_factory):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = tiny_transformer()
    cfg = LoraConfig(r=R, lora_alpha=2 * R, target_modules=["to_q", "to_k", "to_v", "proj_out", "ff.net.2"],
                     rank_pattern={"proj_out": 2}, alpha_pattern={"ff.net.2": 3.0})
    model.add_adapter(cfg, adapter_name="default")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    d = tmp_path_factory.mktemp("peft")
    diffusers.FluxPipeline.save_lora_weights(d, transformer_lora_layers=get_peft_model_state_dict(model),
                                             transformer_lora_adapter_metadata=cfg.to_dict())
    return d / "pytorch_lora_weights.safetensors"


def as_diffusers_keys(bfl_deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, full in bfl_deltas.items():
        if not key.endswith(".weight"):
            continue
        h = full.shape[1]
        for d, piece in keymaps.flux_to_diffusers(key[: -len(".weight")]):
            rows = full if piece.rows is None else full[piece.rows[0] * h : (piece.rows[0] + piece.rows[1]) * h]
            if piece.swap:
                a, b = rows.chunk(2)
                rows = torch.cat([b, a])
            if rows.abs().max() > 0:
                out[d + ".weight"] = rows
    return out


def close(got: dict, want: dict):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-4, atol=1e-5, msg=k)


def test_peft_scales_are_applied_and_outputs_load_everywhere(tmp_path, peft_file, comfy):
    want = diffusers_deltas(peft_file)  # what diffusers applies from the original (lora_alpha / r per module)
    lora = load_lora(peft_file)
    assert not lora.unknown_keys and "lora_adapter_metadata" not in lora.metadata
    base = flux_state_dict(CFG, "dev", seed=2)
    patcher = flux_patcher(base)
    for fmt in ("comfy", "kohya", "onetrainer", "lycoris"):
        clone, missing, refused = apply_lora(patcher, lora_state_dict(lora, fmt))
        assert missing == [] and refused == []
        got = effective_weights(clone)
        close(as_diffusers_keys({k: got[k] - base[k].float() for k in got}), want)
    # diffusers outputs: converted, re-ranked, composed: fresh metadata, loaded by diffusers as intended
    out = save_lora(lora, tmp_path / "d.safetensors", fmt="diffusers")
    close(diffusers_deltas(out), want)
    ranked, _ = rerank_lora(lora, rank=2)
    out = save_lora(ranked, tmp_path / "r.safetensors", fmt="diffusers")
    shapes = {k: v.shape for k, v in base.items()}
    intended = {keymaps.weight_key(n): m.dense_delta(tuple(shapes[keymaps.weight_key(n)])) for n, m in ranked.modules.items()}
    close(diffusers_deltas(out), as_diffusers_keys(intended))
    composed, _ = compose_loras([(lora, 0.5), (load_lora(peft_file), 0.25)])
    out = save_lora(composed, tmp_path / "c.safetensors", fmt="diffusers")
    close(diffusers_deltas(out), {k: v * 0.75 for k, v in want.items()})
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.lora_alpha"] == meta["transformer.r"]
