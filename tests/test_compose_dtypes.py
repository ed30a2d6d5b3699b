"""Exact compose and dtypes: given the dtype it will be stored in, a stack is built in it (unscaled factors
copied bit for bit, each scaled value rounded once, on the smaller factor); without one, only stacks that
need no scaling keep their inputs' dtype. Modules run on worker threads; results and progress keep order."""

from __future__ import annotations

import pytest
import torch

from weightsmith.dtypes import all_finite
from weightsmith.lora.compose import compose_loras
from weightsmith.lora.model import LoRA, LoraTerm, ModuleDelta

WIDE = "diffusion_model.double_blocks.0.img_mlp.2"  # out < in: the up is the smaller factor
TALL = "diffusion_model.double_blocks.0.img_attn.qkv"  # out > in: the down is the smaller factor
SHAPES = {WIDE: (16, 40), TALL: (48, 16)}


def bf16_lora(seed: int, alpha: float) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA({name: ModuleDelta([LoraTerm(torch.randn(o, 4, generator=g).bfloat16(),
                                             torch.randn(4, i, generator=g).bfloat16(), alpha=alpha)])
                 for name, (o, i) in SHAPES.items()}, arch="flux", source_format="kohya")


def dense(lora: LoRA, name: str) -> torch.Tensor:
    return lora.modules[name].dense_delta(SHAPES[name], dtype=torch.float64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bf16_storage_copies_unscaled_factors_and_rounds_scaled_ones_once():
    a, b = bf16_lora(1, alpha=4.0), bf16_lora(2, alpha=2.0)  # coefficients 0.8 and 0.3 · 2/4 = 0.15
    out, _ = compose_loras([(a, 0.8), (b, 0.3)], dtype=torch.bfloat16)
    ratio = 0.15 / 0.8
    for name in SHAPES:
        t = out.modules[name].terms[0]
        ta, tb = a.modules[name].terms[0], b.modules[name].terms[0]
        assert t.up.dtype == t.down.dtype == torch.bfloat16
        assert t.scale == pytest.approx(0.8)
        assert torch.equal(t.up[:, :4], ta.up) and torch.equal(t.down[:4], ta.down)  # the largest: as it is
        if name == WIDE:  # the ratio goes on the smaller factor, rounded once from the exact product
            assert torch.equal(t.up[:, 4:], (tb.up.double() * ratio).bfloat16()) and torch.equal(t.down[4:], tb.down)
        else:
            assert torch.equal(t.down[4:], (tb.down.double() * ratio).bfloat16()) and torch.equal(t.up[:, 4:], tb.up)
        want = 0.8 * dense(a, name) + 0.3 * dense(b, name)
        assert rel(dense(out, name), want) < 4e-3  # one bf16 rounding (2^-9) on part of one factor


def test_building_in_the_storage_dtype_beats_an_fp32_stack_cast_on_save():
    """What the CLI wrote before: an fp32 stack (√ratio on both factors) cast to bf16 on save, which rounds
    both factors of every scaled piece."""
    a, b = bf16_lora(3, alpha=4.0), bf16_lora(4, alpha=4.0)
    items = [(a, 1.0), (b, -0.37)]
    direct, _ = compose_loras(items, dtype=torch.bfloat16)
    fp32, _ = compose_loras(items)
    err_direct = err_cast = 0.0
    for name in SHAPES:
        want = dense(a, name) - 0.37 * dense(b, name)
        t = fp32.modules[name].terms[0]
        cast = LoraTerm(t.up.bfloat16(), t.down.bfloat16(), alpha=t.alpha)
        err_direct += float((dense(direct, name) - want).norm() ** 2)
        err_cast += float((ModuleDelta([cast]).dense_delta(SHAPES[name], dtype=torch.float64) - want).norm() ** 2)
        assert rel(dense(fp32, name), want) < 1e-6  # in memory, without a storage dtype: fp32-exact
    assert err_direct < err_cast


@pytest.mark.parametrize("storage", [None, torch.float16])
def test_scaled_stacks_without_a_wide_storage_dtype_are_fp32(storage):
    """fp16 has a narrower range (a one-sided scale could underflow there): built in fp32, evenly scaled,
    and cast (with its overflow check) by the writer."""
    a, b = bf16_lora(5, alpha=4.0), bf16_lora(6, alpha=4.0)
    out, _ = compose_loras([(a, 0.5), (b, 0.2)], dtype=storage)
    for name in SHAPES:
        t = out.modules[name].terms[0]
        assert t.up.dtype == t.down.dtype == torch.float32
        assert rel(dense(out, name), 0.5 * dense(a, name) + 0.2 * dense(b, name)) < 1e-6


def test_unscaled_stacks_keep_the_inputs_dtype_and_a_lone_term_is_not_copied():
    a = bf16_lora(7, alpha=4.0)
    half, _ = compose_loras([(a, 0.5)])
    twice, _ = compose_loras([(a, 1.0), (a, -1.0)])  # equal magnitudes: ratios ±1, a sign flip
    for name in SHAPES:
        t, ta = half.modules[name].terms[0], a.modules[name].terms[0]
        assert t.up.data_ptr() == ta.up.data_ptr() and t.down.data_ptr() == ta.down.data_ptr()
        assert t.scale == pytest.approx(0.5)
        t2 = twice.modules[name].terms[0]
        assert t2.up.dtype == torch.bfloat16 and t2.rank == 8
        assert dense(twice, name).abs().max() == 0


def test_modules_on_worker_threads_keep_order_and_progress():
    g = torch.Generator().manual_seed(8)
    names = [f"diffusion_model.single_blocks.{i}.linear2" for i in range(12)]
    lo = LoRA({n: ModuleDelta([LoraTerm(torch.randn(8, 2, generator=g), torch.randn(2, 6, generator=g))])
               for n in names}, arch="flux")
    calls = []
    threads = torch.get_num_threads()
    out, rep = compose_loras([(lo, 0.5), (lo, 0.25)], progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i + 1, len(names)) for i in range(len(names))]
    assert [m.module for m in rep.modules] == names and list(out.modules) == names
    for n in names:
        want = 0.75 * lo.modules[n].dense_delta((8, 6))
        assert torch.allclose(out.modules[n].dense_delta((8, 6)), want, rtol=1e-6, atol=1e-7)
    assert torch.get_num_threads() == threads  # the workers' one-thread setting is undone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn])
def test_all_finite_finds_nan_and_inf_and_survives_overflowing_sums(dtype):
    x = torch.full((5000,), 300.0).to(dtype)  # fp16: the sum (1.5e6) overflows, the values do not
    assert all_finite(x) and all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.arange(4))
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.float().clone()
        y[1234] = bad
        y = y.to(dtype)
        assert all_finite(y) == bool(torch.isfinite(y.float()).all()), bad  # e4m3fn has no inf: saturates
