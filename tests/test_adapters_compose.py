"""Adapters through compose and `convert --to-type lora`: LoKr:0.5 + LoRA:1.0 + LoHa:-0.7 composed patches in
the real ComfyUI exactly what loading the three files in a chain does; a plain-LoRA conversion of LoKr /
LoHa / LoCon files is within 1.01x of the optimal rank-R error per layer; DoRA refuses without a base."""

from __future__ import annotations

import pytest
import torch
from adapter_support import lycoris_network, module_tree, save_network
from comfy_support import apply_lora, comfy_lora_patches, effective_weights, flux_patcher
from safetensors.torch import load_file

from weightsmith.cli import main
from weightsmith.errors import MismatchError
from weightsmith.lora import keymaps
from weightsmith.lora.adapters.to_lowrank import lora_to_lowrank
from weightsmith.lora.compose import compose_loras
from weightsmith.lora.formats import load_lora, lora_state_dict
from weightsmith.lora.svd import RankPolicy
from weightsmith.testmodels import FluxConfig, flux_state_dict

pytestmark = pytest.mark.comfy
CFG = FluxConfig()
KEEP = ("img_attn.qkv", "txt_mlp.0", "linear1", "linear2", "img_in")


@pytest.fixture(scope="module")
def flux(comfy):
    sd = flux_state_dict(CFG, "dev", seed=4)
    return sd, flux_patcher(sd)


def _file(tmp_path, base, algo, seed, **kw):
    tree = module_tree(base, lambda k: any(p in k for p in KEEP))
    net = lycoris_network(tree, "lora_unet", algo, seed=seed, **kw)
    return save_network(net, tmp_path / f"{algo}-{seed}.safetensors")


def test_compose_lokr_lora_loha_patches_like_comfys_chain(tmp_path, flux):
    base, patcher = flux
    files = [(_file(tmp_path, base, "lokr", 1, factor=4), 0.5), (_file(tmp_path, base, "lora", 2), 1.0),
             (_file(tmp_path, base, "loha", 3), -0.7)]
    chain = patcher
    for path, s in files:  # three LoraLoaderModelOnly nodes in a row
        chain, missing, refused = apply_lora(chain, load_file(path), s)
        assert missing == [] and refused == []
    want = effective_weights(chain)
    composed, report = compose_loras([(load_lora(p), s) for p, s in files])
    assert all(m.diff is not None for m in composed.modules.values())  # three types on each weight
    assert any("exact full diff" in r.note for r in report.modules)
    for fmt in ("comfy", "kohya"):
        clone, missing, refused = apply_lora(patcher, lora_state_dict(composed, fmt))
        assert missing == [] and refused == []
        got = effective_weights(clone)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5, msg=k)
    # one input alone keeps its type exactly (strength folded into a factor)
    alone, _ = compose_loras([(load_lora(files[0][0]), 0.5)])
    assert {t for m in alone.modules.values() for t in m.types()} == {"lokr"}
    clone, _, _ = apply_lora(patcher, lora_state_dict(alone, "comfy"))
    ref, _, _ = apply_lora(patcher, load_file(files[0][0]), 0.5)
    a, b = effective_weights(clone), effective_weights(ref)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    # with a rank: the optimal re-compression of each summed layer
    ranked, rep = compose_loras([(load_lora(p), s) for p, s in files], rank=4)
    assert all(m.terms and not m.adapters and m.diff is None for m in ranked.modules.values())
    assert all(0 < r.rel_error < 1 for r in rep.modules)


@pytest.mark.parametrize("algo,kw", [("lokr", dict(factor=4)), ("lokr", dict(factor=8, full_matrix=True)),
                                     ("loha", {}), ("full", {})])
def test_to_type_lora_is_within_1_01_of_optimal(tmp_path, flux, algo, kw):
    base, patcher = flux
    lora = load_lora(_file(tmp_path, base, algo, 5, **kw))
    rank = 3
    plain, layers = lora_to_lowrank(lora, RankPolicy("fixed", rank=rank))
    assert len(layers) == len(lora.modules)
    for name, mod in plain.modules.items():
        assert [m for m in mod.types()] == ["lora"] and mod.rank <= rank
        key = keymaps.weight_key(name)
        exact = lora.modules[name].dense_delta(tuple(base[key].shape)).double().flatten(1)
        s = torch.linalg.svdvals(exact)
        optimum = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        err = float((exact - mod.dense_delta(tuple(base[key].shape)).double().flatten(1)).norm() / exact.norm())
        assert err <= 1.01 * optimum + 1e-6, (name, err, optimum)
    _, missing = comfy_lora_patches(patcher, lora_state_dict(plain, "diffusers"))
    assert missing == []


def test_convert_cli_to_type_lora_and_dora_needs_base(tmp_path, flux, capsys):
    base, _ = flux
    path = _file(tmp_path, base, "lokr", 7, factor=4)
    out = tmp_path / "plain.safetensors"
    assert main(["convert", str(path), "-o", str(out), "--to", "diffusers", "--to-type", "lora", "--rank", "4"]) == 0
    text = capsys.readouterr().out
    assert "to plain LoRA" in text and "optimum" in text
    assert {t for m in load_lora(out).modules.values() for t in m.types()} == {"lora"}
    dora = _file(tmp_path, base, "lora", 8, dora_wd=True)
    assert main(["convert", str(dora), "-o", str(tmp_path / "x.safetensors"), "--to-type", "lora"]) == 2
    assert "base model" in capsys.readouterr().err
    with pytest.raises(MismatchError, match="DoRA"):
        compose_loras([(load_lora(dora), 0.5)])
