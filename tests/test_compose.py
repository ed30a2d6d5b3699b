"""LoRA compose and re-rank on canonical LoRAs: exactness, strengths, slices, replacements, errors, and
the factor-only re-compression against the dense truncated SVD."""

from __future__ import annotations

import pytest
import torch

from weightsmith.errors import BadFileError, MismatchError
from weightsmith.lora.compose import compose_loras, rerank_lora
from weightsmith.lora.lowrank import choose_rank, dense_truncated_svd, recompress, svd_of_product
from weightsmith.lora.model import LoRA, LoraTerm, ModuleDelta

QKV = "diffusion_model.double_blocks.0.img_attn.qkv"
PROJ = "diffusion_model.double_blocks.0.img_attn.proj"
LIN1 = "diffusion_model.single_blocks.0.linear1"
NORM = "diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"
CONV = "diffusion_model.input_blocks.1.0.in_layers.2"
H = 16
SHAPES = {QKV: (3 * H, H), PROJ: (H, H), LIN1: (7 * H, H), NORM: (8,), CONV: (12, 6, 3, 3)}


def term(gen, out, inp, r, alpha=None, rows=None, conv=False):
    if conv:
        return LoraTerm(torch.randn(out, r, 1, 1, generator=gen), torch.randn(r, *inp, generator=gen), alpha=alpha, rows=rows)
    return LoraTerm(torch.randn(out, r, generator=gen), torch.randn(r, inp, generator=gen), alpha=alpha, rows=rows)


def fused_lora(seed=0, arch="flux"):
    g = torch.Generator().manual_seed(seed)
    return LoRA({
        QKV: ModuleDelta([term(g, 3 * H, H, 4, alpha=2.0)], diff_b=torch.randn(3 * H, generator=g)),
        PROJ: ModuleDelta([term(g, H, H, 3, alpha=6.0)]),
        LIN1: ModuleDelta([term(g, 7 * H, H, 5)]),
    }, arch=arch, source_format="kohya")


def split_lora(seed=1, arch="flux"):
    """diffusers-style: q/k/v (and linear1's q/k/v/mlp) as row slices of the fused weights."""
    g = torch.Generator().manual_seed(seed)
    qkv = [term(g, H, H, 2, rows=(i * H, H)) for i in range(3)]
    lin1 = [term(g, H, H, 3, rows=(i * H, H)) for i in range(3)] + [term(g, 4 * H, H, 3, alpha=1.5, rows=(3 * H, 4 * H))]
    return LoRA({QKV: ModuleDelta(qkv), LIN1: ModuleDelta(lin1),
                 NORM: ModuleDelta(diff=torch.randn(8, generator=g))}, arch=arch, source_format="diffusers")


def dense(lora: LoRA, name: str) -> torch.Tensor:
    return lora.modules[name].dense_delta(SHAPES[name]) if name in lora.modules else torch.zeros(SHAPES[name])


def expected(items, name):
    return sum(s * dense(lo, name) for lo, s in items)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_exact_mixed_fused_split_equals_sum_of_deltas():
    a, b = fused_lora(), split_lora()
    items = [(a, 0.8), (b, -0.6)]
    out, rep = compose_loras(items, names=["A", "B"])
    for name in (QKV, PROJ, LIN1, NORM):
        assert rel(dense(out, name), expected(items, name)) < 1e-6, name
    # fused + split on one weight: one term over the whole weight, rank = sum of ranks
    assert [(t.rows, t.rank) for t in out.modules[QKV].terms] == [(None, 4 + 3 * 2)]
    assert torch.allclose(out.modules[QKV].diff_b, 0.8 * a.modules[QKV].diff_b)
    assert torch.allclose(out.modules[NORM].diff, -0.6 * b.modules[NORM].diff)
    assert set(out.modules) == {QKV, PROJ, LIN1, NORM}  # union
    assert rep.mode == "exact" and rep.max_rel_error == 0
    assert {m.module: m.rank_out for m in rep.modules}[LIN1] == 5 + 3 * 3 + 3


def test_split_only_inputs_keep_their_slices():
    b, c = split_lora(1), split_lora(2)
    out, _ = compose_loras([(b, 1.0), (c, 0.5)])
    assert [(t.rows, t.rank) for t in out.modules[QKV].terms] == [((i * H, H), 4) for i in range(3)]
    assert rel(dense(out, LIN1), dense(b, LIN1) + 0.5 * dense(c, LIN1)) < 1e-6


def test_half_strength_is_exactly_half_and_factors_untouched():
    a = fused_lora()
    out, _ = compose_loras([(a, 0.5)])
    for name in (QKV, PROJ, LIN1):
        t_in, t_out = a.modules[name].terms[0], out.modules[name].terms[0]
        assert torch.equal(t_out.up, t_in.up) and torch.equal(t_out.down, t_in.down)
        assert t_out.scale == pytest.approx(0.5 * t_in.scale, rel=1e-15)
        assert torch.allclose(dense(out, name), 0.5 * dense(a, name), rtol=1e-6, atol=0)
    assert torch.equal(out.modules[QKV].diff_b, 0.5 * a.modules[QKV].diff_b)


def test_low_precision_inputs_are_scaled_in_fp32():
    a, b = fused_lora(), fused_lora(5)
    for lo in (a, b):
        for m in lo.modules.values():
            for t in m.terms:
                t.up, t.down = t.up.bfloat16(), t.down.bfloat16()
    out, _ = compose_loras([(a, 0.8), (b, 0.3)])
    assert out.modules[PROJ].terms[0].up.dtype == torch.float32
    for name in (QKV, PROJ, LIN1):
        assert rel(dense(out, name), 0.8 * dense(a, name) + 0.3 * dense(b, name)) < 1e-6, name


def test_negative_and_zero_strengths():
    a, b = fused_lora(), fused_lora(5)
    out, _ = compose_loras([(a, -1.0), (b, 0.0)])
    for name in (QKV, PROJ, LIN1):
        assert rel(dense(out, name), -dense(a, name)) < 1e-6
        assert out.modules[name].rank == a.modules[name].rank  # the zero-strength input adds no rank
    cancel, _ = compose_loras([(a, 1.0), (a, -1.0)])
    assert dense(cancel, PROJ).abs().max() < 1e-5


def test_conv_terms_keep_conv_layout():
    g = torch.Generator().manual_seed(3)
    x = LoRA({CONV: ModuleDelta([term(g, 12, (6, 3, 3), 4, alpha=8.0, conv=True)])}, arch="sd15")
    y = LoRA({CONV: ModuleDelta([term(g, 12, (6, 3, 3), 2, conv=True)])}, arch="sd15")
    out, _ = compose_loras([(x, 0.7), (y, 1.3)])
    t = out.modules[CONV].terms[0]
    assert t.up.shape == (12, 6, 1, 1) and t.down.shape == (6, 6, 3, 3)
    assert rel(dense(out, CONV), 0.7 * dense(x, CONV) + 1.3 * dense(y, CONV)) < 1e-6
    small, rep = compose_loras([(x, 0.7), (y, 1.3)], rank=3)
    ref_u, ref_d = dense_truncated_svd((0.7 * dense(x, CONV) + 1.3 * dense(y, CONV)).reshape(12, -1), 3)
    assert small.modules[CONV].terms[0].down.shape == (3, 6, 3, 3)
    assert rel(dense(small, CONV).reshape(12, -1), ref_u @ ref_d) < 1e-5


def test_set_weight_once_and_twice():
    g = torch.Generator().manual_seed(4)
    s1 = LoRA({NORM: ModuleDelta(set_weight=torch.randn(8, generator=g))}, arch="flux")
    s2 = LoRA({NORM: ModuleDelta(set_weight=torch.randn(8, generator=g))}, arch="flux")
    with pytest.raises(MismatchError, match="style.safetensors.*control.safetensors"):
        compose_loras([(s1, 1.0), (s2, 1.0)], names=["style.safetensors", "control.safetensors"])
    # a replacement ignores strength (as ComfyUI's "set" does); later diffs add onto it, earlier ones are overwritten
    d = LoRA({NORM: ModuleDelta(diff=torch.ones(8))}, arch="flux")
    out, rep = compose_loras([(d, 1.0), (s1, 0.3), (d, 0.5)])
    assert torch.allclose(out.modules[NORM].set_weight, s1.modules[NORM].set_weight + 0.5)
    assert out.modules[NORM].diff is None
    assert "overrides earlier changes" in rep.modules[0].note


def test_lowrank_and_diff_on_one_weight_fold_into_the_diff():
    a = fused_lora()
    full = LoRA({PROJ: ModuleDelta(diff=torch.randn(H, H))}, arch="flux")
    out, rep = compose_loras([(a, 0.5), (full, 2.0)])
    m = out.modules[PROJ]
    assert not m.terms and m.diff is not None
    assert rel(m.diff, 0.5 * dense(a, PROJ) + 2.0 * full.modules[PROJ].diff) < 1e-6
    assert "folded" in next(r.note for r in rep.modules if r.module == PROJ)


def test_architecture_mismatch_is_a_clear_error():
    with pytest.raises(MismatchError, match="flux_to_chroma"):
        compose_loras([(fused_lora(arch="flux"), 1.0), (split_lora(arch="chroma"), 1.0)])
    with pytest.raises(MismatchError, match="different architectures"):
        compose_loras([(fused_lora(arch="flux"), 1.0), (LoRA({}, arch="sdxl"), 1.0)])
    out, _ = compose_loras([(fused_lora(arch="flux"), 1.0), (split_lora(arch="unknown"), 1.0)])
    assert out.arch == "flux"


def test_shape_mismatch_names_module_and_inputs():
    g = torch.Generator().manual_seed(6)
    other = LoRA({PROJ: ModuleDelta([term(g, H, 2 * H, 2)])}, arch="flux")
    with pytest.raises(MismatchError, match=r"img_attn\.proj.*A.*B"):
        compose_loras([(fused_lora(), 1.0), (other, 1.0)], names=["A", "B"])
    with pytest.raises(MismatchError, match="at least one"):
        compose_loras([])


def test_nan_factors_are_reported_in_exact_mode_and_refused_by_recompression():
    nan = fused_lora()
    nan.modules[PROJ].terms[0].up[0, 0] = float("nan")
    out, rep = compose_loras([(fused_lora(seed=3), 1.0), (nan, 0.5)], names=["ok.safetensors", "nan.safetensors"])
    assert not torch.isfinite(out.modules[PROJ].terms[0].up).all()  # copied as it is, and said so
    assert rep.summary()["nonfinite_modules"] == [{"module": PROJ, "inputs": ["nan.safetensors"]}]
    assert any("NaN/Inf" in w and PROJ in w and "nan.safetensors" in w for w in rep.warnings)
    assert "NaN/Inf" in rep.text()
    for call in (lambda: compose_loras([(nan, 1.0)], rank=2, names=["nan.safetensors"]),
                 lambda: rerank_lora(nan, rank=2, name="nan.safetensors")):
        with pytest.raises(BadFileError, match=r"nan\.safetensors: module '.*img_attn\.proj' holds NaN.*download"):
            call()
    with pytest.raises(MismatchError, match="NaN or Inf"):  # the factor algebra itself never reaches LAPACK
        svd_of_product(nan.modules[PROJ].terms[0].up, nan.modules[PROJ].terms[0].down)


def test_strengths_that_overflow_fp32_are_refused():
    with pytest.raises(MismatchError, match=r"A: strength 1e\+39 is beyond fp32's range.*give a smaller"):
        compose_loras([(fused_lora(), 1e39)], names=["A"])
    with pytest.raises(MismatchError, match="not a finite number; give"):
        compose_loras([(fused_lora(), float("nan"))], names=["A"])
    # finite for fp32, but the stored alpha (strength · alpha, as fp32) would be inf
    with pytest.raises(MismatchError, match=r"module '.*img_attn.*' \(A\): .*overflow fp32.*smaller strengths"):
        compose_loras([(fused_lora(), 3e38)], names=["A"])


def test_rank_warning_and_unknown_keys_reported():
    a = fused_lora()
    a.unknown_keys = ["lora_unet_weird.hada_w1_a"]
    out, rep = compose_loras([(a, 1.0), (fused_lora(9), 1.0)], warn_rank=8)
    assert any("exceed rank 8" in w for w in rep.warnings)
    assert any("hada_w1_a" in w for w in rep.warnings)
    assert "rank above 8" in next(r.note for r in rep.modules if r.module == LIN1)
    assert "per module" in rep.text() and rep.to_dict()["per_module"]


@pytest.mark.parametrize("r", [1, 3, 7])
def test_recompress_equals_dense_truncated_svd(r):
    a, b = fused_lora(), split_lora()
    items = [(a, 0.8), (b, -0.6)]
    out, rep = compose_loras(items, rank=r)
    by_name = {m.module: m for m in rep.modules}
    for name in (QKV, PROJ, LIN1):
        exact = expected(items, name)
        u, d = dense_truncated_svd(exact.double(), r)
        ref = (u @ d).float()
        got = dense(out, name)
        assert rel(got, ref) < 1e-5, name
        assert out.modules[name].rank <= r
        # the reported error is the true error against the exact composition
        assert by_name[name].rel_error == pytest.approx(rel(got, exact), rel=1e-4, abs=1e-6)
    assert torch.allclose(dense(out, NORM), expected(items, NORM))  # diffs stay exact
    assert rep.total_rel_error > 0


def test_recompress_of_disjoint_slices_is_optimal_for_the_fused_weight():
    b, c = split_lora(1), split_lora(2)
    items = [(b, 1.0), (c, 0.5)]
    out, _ = compose_loras(items, rank=3)
    ts = out.modules[QKV].terms
    assert [t.rows for t in ts] == [(i * H, H) for i in range(3)]
    assert all(t.down is ts[0].down for t in ts)  # one shared down: writers store it fused at rank 3
    u, d = dense_truncated_svd(expected(items, QKV).double(), 3)
    assert rel(dense(out, QKV), (u @ d).float()) < 1e-5


def test_energy_mode_picks_the_rank_of_a_known_spectrum():
    g = torch.Generator().manual_seed(7)
    qu, _ = torch.linalg.qr(torch.randn(40, 6, generator=g))
    qd, _ = torch.linalg.qr(torch.randn(30, 6, generator=g))
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.1, 0.01])
    lora = LoRA({PROJ: ModuleDelta([LoraTerm(qu * s, qd.T.contiguous())])}, arch="flux")
    energy = float((s[:3] ** 2).sum() / (s**2).sum())  # exactly 3 values' worth
    out, rep = rerank_lora(lora, energy=energy - 1e-6)
    assert out.modules[PROJ].rank == 3
    assert rep.modules[0].energy_kept == pytest.approx(energy, rel=1e-5)
    out, _ = rerank_lora(lora, energy=energy + 1e-4)
    assert out.modules[PROJ].rank == 4
    out, _ = rerank_lora(lora, rank=2, energy=energy)  # both: the smaller
    assert out.modules[PROJ].rank == 2


def test_cancelling_inputs_recompress_to_nothing():
    a = fused_lora()
    out, rep = compose_loras([(a, 0.7), (a, -0.7)], rank=2)
    assert all(not m.terms for m in out.modules.values())  # only the (cancelled) bias diffs remain
    assert {r.module: r.rank_out for r in rep.modules} == {QKV: 0, PROJ: 0, LIN1: 0}
    assert dense(out, QKV).abs().max() == 0


def test_rerank_keeps_small_modules_exact():
    a = fused_lora()
    out, rep = rerank_lora(a, rank=4)
    assert torch.equal(out.modules[PROJ].terms[0].up, a.modules[PROJ].terms[0].up)  # rank 3 ≤ 4: untouched
    assert out.modules[LIN1].rank == 4 and out.modules[QKV].rank == 4
    assert out.source_format == "kohya"
    with pytest.raises(MismatchError):
        rerank_lora(a)


def test_svd_of_product_matches_dense_svd():
    g = torch.Generator().manual_seed(8)
    up, down = torch.randn(50, 9, generator=g, dtype=torch.float64), torch.randn(9, 33, generator=g, dtype=torch.float64)
    svd = svd_of_product(up, down)
    ref = torch.linalg.svdvals(up @ down)
    assert torch.allclose(svd.singular_values, ref[:9], rtol=1e-10)
    assert torch.allclose(svd.left * svd.singular_values @ svd.right, up @ down, atol=1e-10)
    rc = recompress(up, down, rank=4)
    assert rc.abs_error == pytest.approx(float(ref[4:].square().sum().sqrt()), rel=1e-9)
    assert choose_rank(torch.tensor([3.0, 0.0]), rank=5) == 1
    assert choose_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), energy=0.5) == 2
