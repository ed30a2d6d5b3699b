"""Composed LoRAs applied in the real ComfyUI equal the inputs applied one after another with their
strengths through ComfyUI's own LoRA chain (what chained LoraLoaderModelOnly nodes do), on real small
Flux, SD1.5 and SDXL models.

The canonical LoRAs are turned into ComfyUI state dicts here with ComfyUI's own key map (inverted), so
these tests depend only on ComfyUI and the compose core; the file-format round trip through
`weightsmith.lora.formats` is tested in test_compose_files.py.
"""

from __future__ import annotations

import pytest
import torch
from comfy_support import apply_lora, effective_weights, flux_patcher, unet_patcher

from weightsmith.lora.compose import compose_loras
from weightsmith.lora.lowrank import dense_truncated_svd
from weightsmith.lora.model import LoRA, LoraTerm, ModuleDelta
from weightsmith.testmodels import FluxConfig, flux_state_dict

pytestmark = pytest.mark.comfy
PREFIX = "diffusion_model."


def comfy_state_dict(lora: LoRA, patcher) -> dict[str, torch.Tensor]:
    """A ComfyUI-loadable state dict for a canonical LoRA, named through ComfyUI's own key map: whole
    weights by their generic `diffusion_model.X` names, row slices by the names ComfyUI maps to them."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    by_target = {}
    for name, target in key_map.items():
        if isinstance(target, tuple) and len(target) == 2:
            by_target.setdefault((target[0], (target[1][1], target[1][2])), name)
    sd: dict[str, torch.Tensor] = {}
    for module, delta in lora.modules.items():
        wkey = module if module.endswith(".scale") else module + ".weight"
        for t in delta.terms:
            name = module if t.rows is None else by_target[(wkey, t.rows)]
            assert f"{name}.lora_up.weight" not in sd, "one term per target"
            sd[f"{name}.lora_up.weight"] = t.up
            sd[f"{name}.lora_down.weight"] = t.down
            sd[f"{name}.alpha"] = torch.tensor(t.strength * (t.alpha if t.alpha is not None else t.rank))
        for suffix, v in (("diff", delta.diff), ("diff_b", delta.diff_b), ("set_weight", delta.set_weight)):
            if v is not None:
                sd[f"{module}.{suffix}"] = v
    return sd


def lora_of_model(sd, seed, rank, arch, split=False, every=1, alpha=None, bias=False):
    """Random LoRA on the 2-D/4-D weights of a model state dict (conv factors in kohya/LoCon layout). With
    `split`, Flux qkv/linear1 get diffusers-style row-slice terms (q, k, v[, mlp])."""
    g = torch.Generator().manual_seed(seed)
    lora = LoRA(arch=arch)
    weights = [k for k, v in sd.items() if k.endswith(".weight") and v.ndim in (2, 4)]
    for i, key in enumerate(weights):
        if i % every:
            continue
        w = sd[key]
        module = PREFIX + key[: -len(".weight")]
        out, inp = w.shape[0], w.shape[1:]
        if split and (key.endswith("qkv.weight") or key.endswith("linear1.weight")):
            h = w.shape[1]
            cuts = [(0, h), (h, h), (2 * h, h)] + ([(3 * h, out - 3 * h)] if out > 3 * h else [])
        else:
            cuts = [None]
        for rows in cuts:
            n = out if rows is None else rows[1]
            up_shape = (n, rank) if w.ndim == 2 else (n, rank, 1, 1)
            term = LoraTerm(torch.randn(up_shape, generator=g) * 0.05, torch.randn(rank, *inp, generator=g) * 0.05,
                            alpha=alpha, rows=rows)
            lora.module(module).terms.append(term)
        if bias and key[: -len(".weight")] + ".bias" in sd:
            lora.module(module).diff_b = torch.randn(out, generator=g) * 0.01
    return lora


def chain(patcher, loras_with_strengths):
    """Apply each LoRA with its strength through ComfyUI, one after the other (chained LoraLoaderModelOnly)."""
    current = patcher
    for lora, s in loras_with_strengths:
        current, missing, refused = apply_lora(current, comfy_state_dict(lora, patcher), s)
        assert not missing and not refused
    return current


def assert_same_weights(a, b, base, tol=2e-6):
    wa, wb = effective_weights(a), effective_weights(b)
    assert wa.keys() == wb.keys()
    wa, wb = {k: v.detach() for k, v in wa.items()}, {k: v.detach() for k, v in wb.items()}
    changed = 0
    for k in wa:
        delta = (wa[k] - base[k].float()).abs().max()
        err = (wa[k] - wb[k]).abs().max()
        assert err <= tol * max(1.0, float(base[k].abs().max())), (k, float(err))
        changed += bool(delta > 0)
    assert changed > 0


@pytest.fixture(scope="module")
def flux():
    sd = flux_state_dict(FluxConfig(), "dev", seed=0)
    return sd, flux_patcher(sd)


def test_flux_exact_compose_equals_comfy_chain(flux):
    sd, patcher = flux
    a = lora_of_model(sd, 1, 4, "flux", alpha=2.0, bias=True)
    b = lora_of_model(sd, 2, 3, "flux", split=True, every=2)
    c = lora_of_model(sd, 3, 8, "flux", alpha=16.0, every=3)
    # norm-scale changes: a diff, then a replacement (overwrites it), then a diff on top of the replacement
    scale = "double_blocks.0.img_attn.norm.key_norm.scale"
    a.module(PREFIX + scale).diff = torch.randn(sd[scale].shape) * 0.1
    c.module(PREFIX + scale).set_weight = torch.randn(sd[scale].shape)
    d = LoRA({PREFIX + scale: ModuleDelta(diff=torch.ones(sd[scale].shape))}, arch="flux")
    items = [(a, 0.8), (b, -0.6), (c, 0.5), (d, 0.25)]
    composed, report = compose_loras(items)
    assert all(m.rank_out == m.rank_in for m in report.modules)  # exact: ranks add up
    assert report.rank_max > 4 + 3 + 8  # fused + split on one weight stacked into one term
    applied, missing, refused = apply_lora(patcher, comfy_state_dict(composed, patcher), 1.0)
    assert not missing and not refused
    assert_same_weights(applied, chain(patcher, items), sd)


def test_flux_single_lora_half_and_negative_strength(flux):
    sd, patcher = flux
    a = lora_of_model(sd, 4, 4, "flux", alpha=1.0, bias=True)
    for s in (0.5, -1.5):
        composed, _ = compose_loras([(a, s)])
        applied, missing, _ = apply_lora(patcher, comfy_state_dict(composed, patcher), 1.0)
        assert not missing
        assert_same_weights(applied, chain(patcher, [(a, s)]), sd)
    # and "half" literally: the composed ΔW is half the input's ΔW, weight by weight
    half, _ = compose_loras([(a, 0.5)])
    w_full = effective_weights(chain(patcher, [(a, 1.0)]))
    w_half = effective_weights(apply_lora(patcher, comfy_state_dict(half, patcher), 1.0)[0])
    for k in w_full:
        base = sd[k].float()
        assert torch.allclose(w_half[k] - base, 0.5 * (w_full[k] - base), atol=1e-6, rtol=1e-5), k


def test_flux_recompressed_compose_is_optimal_in_comfy(flux):
    sd, patcher = flux
    a = lora_of_model(sd, 5, 4, "flux", alpha=2.0)
    b = lora_of_model(sd, 6, 4, "flux", split=True)
    items = [(a, 1.0), (b, 0.7)]
    exact, _ = compose_loras(items)
    small, report = compose_loras(items, rank=5)
    w_exact = {k: v.detach() for k, v in effective_weights(apply_lora(patcher, comfy_state_dict(exact, patcher), 1.0)[0]).items()}
    w_small = {k: v.detach() for k, v in effective_weights(apply_lora(patcher, comfy_state_dict(small, patcher), 1.0)[0]).items()}
    errors = {r.module[len(PREFIX):] + ".weight": r for r in report.modules}
    for k, rep in errors.items():
        d_exact = (w_exact[k] - sd[k]).double().reshape(sd[k].shape[0], -1)
        u, dn = dense_truncated_svd(d_exact, 5)
        d_small = (w_small[k] - sd[k]).double().reshape(d_exact.shape)
        assert float((d_small - u @ dn).norm() / d_exact.norm()) < 1e-4, k
        assert rep.rel_error == pytest.approx(float((d_small - d_exact).norm() / d_exact.norm()), rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_sd_unet_exact_compose_equals_comfy_chain(kind):
    from weightsmith.sdunet import sd_unet_state_dict

    sd = sd_unet_state_dict(kind, "tiny", seed=0)
    patcher = unet_patcher(sd, kind)
    a = lora_of_model(sd, 11, 4, kind, alpha=8.0, bias=True)  # linears and 3x3 / 1x1 convs
    b = lora_of_model(sd, 12, 2, kind, every=2)
    c = lora_of_model(sd, 13, 6, kind, alpha=3.0, every=3)
    items = [(a, 1.0), (b, -0.5), (c, 0.3)]
    composed, report = compose_loras(items)
    conv = [m for m in composed.modules.values() if m.terms and m.terms[0].down.ndim == 4]
    assert conv and all(m.terms[0].up.ndim == 4 for m in conv)
    applied, missing, refused = apply_lora(patcher, comfy_state_dict(composed, patcher), 1.0)
    assert not missing and not refused
    assert_same_weights(applied, chain(patcher, items), sd)


def test_nodes_compose_and_rerank(flux):
    from comfy_support import import_pack

    sd, patcher = flux
    pack = import_pack()
    compose_cls = pack.NODE_CLASS_MAPPINGS["WeightsmithComposeLoRAs"]
    rerank_cls = pack.NODE_CLASS_MAPPINGS["WeightsmithRerankLoRA"]
    for cls in (compose_cls, rerank_cls):
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, (_, opts) in spec.get(group, {}).items():
                assert opts.get("tooltip"), f"{cls.__name__}.{name} has no tooltip"
    a = lora_of_model(sd, 21, 4, "flux", alpha=2.0)
    b = lora_of_model(sd, 22, 2, "flux", split=True)
    node = compose_cls()
    first = node.compose(rank=0, energy=0.0, lora_1=a, strength_1=0.8, strength_2=1.0, strength_3=1.0, strength_4=1.0)
    lora, text = first["result"]
    assert "weightsmith_report" in first["ui"] and "compose (exact)" in text
    # chaining: a second node takes the first one's output as `extra`
    second = node.compose(rank=0, energy=0.0, lora_2=b, strength_1=1.0, strength_2=-0.6, strength_3=1.0,
                          strength_4=1.0, extra=lora)["result"][0]
    applied, missing, _ = apply_lora(patcher, comfy_state_dict(second, patcher), 1.0)
    assert not missing
    assert_same_weights(applied, chain(patcher, [(a, 0.8), (b, -0.6)]), sd)
    with pytest.raises(ValueError, match="at least one"):
        node.compose(rank=0, energy=0.0, strength_1=1.0, strength_2=1.0, strength_3=1.0, strength_4=1.0)
    reranked, text = rerank_cls().rerank(second, rank=3, energy=0.0)["result"]
    assert max(m.rank for m in reranked.modules.values()) == 3 and "rel_error" in text
