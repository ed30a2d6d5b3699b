"""The native fp8 kernels (core/encodings/fp8_native.c) change no result: each equals the torch route bit for
bit — decoding every e4m3 code with every kind of scale, quantizing fp32 values around every rounding
boundary, the fused weighted sum of scaled inputs (amax and quantized output) with weights that are not
powers of two — and a scaled-fp8 merge writes the same bytes and the same report with the kernels as
without them. Where they cannot be used (no compiler, WEIGHTSMITH_NATIVE=0, a flush-to-zero thread, an
e4m3 NaN code) the torch route runs instead, with the same outcome."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from weightsmith.encodings import fp8, fp8_native
from weightsmith.encodings.encode import ScaledRows, fp8_scale, quantize_fp8
from weightsmith.merge import execute_merge, plan_merge
from weightsmith.merge.fp8_fused import native_weighted_sum
from weightsmith.merge.methods import weighted_sum_
from weightsmith.safetensors_io import StreamingWriter
from weightsmith.sources import open_model

E4M3 = torch.float8_e4m3fn
pytestmark = pytest.mark.skipif(fp8_native.library() is None, reason=f"native kernels {fp8_native.state()}")


@pytest.fixture
def torch_route(monkeypatch):
    """The kernels switched off for the test (every caller then takes the torch route)."""
    monkeypatch.setattr(fp8_native, "library", lambda: None)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def test_the_kernels_are_built_where_a_compiler_is():
    assert shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    assert fp8_native.state() == "loaded"
    assert fp8_native.library() is fp8_native.library()  # built once, cached


def test_switched_off_by_environment(tmp_path):
    code = ("from weightsmith.encodings import fp8_native as n; import torch; from weightsmith.encodings import fp8;"
            "q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn);"
            "assert torch.equal(fp8.decode_fp8(q, torch.tensor(0.5)).nan_to_num(), (q.float() * 0.5).nan_to_num());"
            "print(n.library(), n.state())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "WEIGHTSMITH_NATIVE": "0"})
    assert out.stdout.strip() == "None off: WEIGHTSMITH_NATIVE=0"


@pytest.mark.parametrize("scale", [1.0, 3.7e-4, -0.013, 1e-40, 2.0 ** -149, 3e38, 1.7e36, 0.0, float("inf"), float("nan")])
def test_decode_every_code_with_every_kind_of_scale(scale):
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(33).view(E4M3)  # odd length: vector tails
    s = torch.tensor(scale, dtype=torch.float32)
    assert same_bits(fp8.decode_fp8(q, s), q.to(torch.float32) * s)


def _boundary_floats() -> torch.Tensor:
    """fp32 values at and one ulp either side of every e4m3 value and every midpoint between neighbours
    (where rounding to nearest even decides), beyond the range, subnormal, zero, inf and NaN, both signs."""
    codes = torch.arange(0, 127, dtype=torch.int32).to(torch.uint8).view(E4M3).float()
    mids = (codes[:-1] + codes[1:]) / 2
    base = torch.cat([codes, mids, torch.tensor([464.0, 470.0, 480.0, 512.0, 1e6, 3e38, 2.0 ** -10, 2.0 ** -12,
                                                  1e-45, float("inf"), float("nan")])])
    bits = base.view(torch.int32)
    near = torch.cat([bits - 1, bits, bits + 1]).view(torch.float32)
    return torch.cat([near, -near])


@pytest.mark.parametrize("saturate", [False, True])
def test_quantize_equals_torch_at_every_rounding_boundary(saturate):
    x = torch.cat([_boundary_floats(), torch.randn(100_003, generator=torch.Generator().manual_seed(1)) * 300])
    for scale in (1.0, 0.37, 3.1e-3, 7.0):
        s = torch.tensor(scale)
        got = quantize_fp8(x.clone(), s, E4M3, saturate=saturate)
        want = (x / s).clamp(-448, 448).to(E4M3) if saturate else (x / s).to(E4M3)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), scale


def _payload(seed: int, n: int, nan: bool = False) -> torch.Tensor:
    codes = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32).to(torch.uint8)
    if not nan:
        codes[(codes & 0x7F) == 0x7F] = 0x7E
    return codes.view(E4M3)


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.3, 0.7), (1.7, -0.4, 0.2)])
def test_fused_weighted_sum_equals_decode_then_weighted_sum(weights):
    n = 50_001
    qs = [_payload(i, n) for i in range(len(weights))]
    scales = [torch.tensor(s) for s in (3.1e-4, 2.2e-3, 1.3e-5)[:len(weights)]]
    want = weighted_sum_([q.float() * s for q, s in zip(qs, scales)], list(weights), normalize=False)
    factors = [float(fp8.fold_shift(s)[0]) for s in scales]
    y = torch.empty(n)
    nan, amax = fp8_native.wsum_e4m3([q.view(torch.int8) for q in qs], factors, list(weights), y)
    assert not nan and same_bits(y, want)
    lo, hi = torch.aminmax(want)
    assert amax == max(-float(lo), float(hi))
    assert fp8_native.wsum_amax_e4m3([q.view(torch.int8) for q in qs], factors, list(weights)) == (False, amax)
    scale = fp8_scale(amax, E4M3)
    out = torch.empty(n, dtype=torch.uint8)
    assert not fp8_native.wsum_quantize_e4m3([q.view(torch.int8) for q in qs], factors, list(weights), float(scale), out)
    assert torch.equal(out, (want / scale).to(E4M3).view(torch.uint8))


def test_nan_codes_are_reported_not_hidden():
    q = _payload(3, 4097, nan=True)
    assert ((q.view(torch.uint8) & 0x7F) == 0x7F).any()
    f = [float(fp8.fold_shift(torch.tensor(0.01))[0])]
    assert fp8_native.wsum_amax_e4m3([q.view(torch.int8)], f, [1.0])[0]
    assert same_bits(fp8.decode_fp8(q, torch.tensor(0.01)), q.float() * 0.01)  # decode turns them into NaN


def test_a_flush_to_zero_thread_is_not_given_the_native_sum():
    q = _payload(4, 1000)
    rows = ScaledRows(q.reshape(10, 100), torch.tensor(0.02))

    class Key:
        method, weights, numel, shape = "weighted_sum", (1.0,), 1000, (10, 100)
    native = native_weighted_sum(Key(), [rows], {})
    assert native is not None and native.amax(0, 1000) is not None
    if not torch.set_flush_denormal(True):
        pytest.skip("no flush-to-zero mode on this CPU")
    try:
        assert native.amax(0, 1000) is None
        assert native.quantize(0, 1000, 0.01, torch.empty(1000, dtype=torch.uint8)) is False
    finally:
        torch.set_flush_denormal(False)


def _scaled_file(path, seed: int, rows: int = 256, cols: int = 384) -> None:
    g = torch.Generator().manual_seed(seed)
    plan, tensors = {"scaled_fp8": ((2,), E4M3)}, {"scaled_fp8": torch.zeros(2, dtype=E4M3)}
    for i in range(3):
        w = torch.randn(rows, cols, generator=g) * (i + 1)
        s = w.abs().amax() / 448
        tensors[f"double_blocks.{i}.img_attn.qkv.weight"] = (w / s).to(E4M3)
        tensors[f"double_blocks.{i}.img_attn.qkv.scale_weight"] = s.reshape(())
        tensors[f"double_blocks.{i}.img_attn.qkv.bias"] = torch.randn(rows, generator=g).to(torch.bfloat16)
    plan = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    with StreamingWriter(path, plan) as w:
        for k, t in tensors.items():
            w.write(k, t)


def _scaled_pair(tmp_path):
    """Two scaled-fp8 files and a merge of them (0.3/0.7, many blocks per key) into `out`."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _scaled_file(a, 1)
    _scaled_file(b, 2)

    def run(out, **kw):
        plan = plan_merge([open_model(a), open_model(b)], "weighted_sum", [0.3, 0.7])
        return execute_merge(plan, out, chunk_elems=4096, **kw)
    return run


@pytest.mark.parametrize("stats", ["sample", "full"])
def test_merge_writes_the_same_bytes_with_and_without_the_kernels(tmp_path, monkeypatch, stats):
    merge = _scaled_pair(tmp_path)

    def run(out):
        return merge(out, dtype="keep", stats=stats)

    calls = []
    amax = fp8_native.wsum_amax_e4m3
    monkeypatch.setattr(fp8_native, "wsum_amax_e4m3", lambda *a: calls.append(1) or amax(*a))
    fast = run(tmp_path / "fast.safetensors")
    # the kernels did the blocks' amax (all but the sampled ones: with stats="full" every block, so the
    # amax comes the generic way and only the quantization is native)
    assert len(calls) > 3 * 10 if stats == "sample" else not calls
    monkeypatch.setattr(fp8_native, "library", lambda: None)
    slow = run(tmp_path / "slow.safetensors")
    with open_model(tmp_path / "fast.safetensors") as f, open_model(tmp_path / "slow.safetensors") as s:
        raw_f, raw_s = f.side_tensor, s.side_tensor
        for k in s.keys():
            assert torch.equal(f.get(k), s.get(k)), k
        for k in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.2.img_attn.qkv.scale_weight"):
            assert torch.equal(raw_f(k).view(torch.uint8) if raw_f(k).dtype == E4M3 else raw_f(k),
                               raw_s(k).view(torch.uint8) if raw_s(k).dtype == E4M3 else raw_s(k))
    assert [(k.name, k.sq, k.dot, k.change) for k in fast.key_stats] == \
        [(k.name, k.sq, k.dot, k.change) for k in slow.key_stats]


def test_a_range_the_kernel_declines_takes_the_generic_route_with_the_same_bytes(tmp_path, monkeypatch):
    """A worker that flushes subnormals declines the native quantizing pass: those ranges are recomputed
    the generic way from the key's row inputs (read on the calling thread), and the file is unchanged."""
    from weightsmith.merge.fp8_fused import NativeWeightedSum

    merge = _scaled_pair(tmp_path)

    def run(out):
        return merge(out, dtype="keep")

    run(tmp_path / "native.safetensors")
    monkeypatch.setattr(NativeWeightedSum, "quantize", lambda self, lo, hi, scale, out: False)
    run(tmp_path / "declined.safetensors")
    with open_model(tmp_path / "native.safetensors") as f, open_model(tmp_path / "declined.safetensors") as s:
        for k in s.keys():
            assert torch.equal(f.get(k), s.get(k)), k


@pytest.mark.parametrize("dtype", ["bf16", "fp32", "fp8"])
def test_merge_to_a_plain_dtype_writes_the_same_bytes_with_and_without_the_kernels(tmp_path, monkeypatch, dtype):
    merge = _scaled_pair(tmp_path)

    def run(out):
        return merge(out, dtype=dtype)

    calls = []
    summed = fp8_native.wsum_e4m3
    monkeypatch.setattr(fp8_native, "wsum_e4m3", lambda *a: calls.append(1) or summed(*a))
    run(tmp_path / "fast.safetensors")
    assert len(calls) > 3 * 10  # every block but the sampled ones
    monkeypatch.setattr(fp8_native, "library", lambda: None)
    run(tmp_path / "slow.safetensors")
    with open_model(tmp_path / "fast.safetensors") as f, open_model(tmp_path / "slow.safetensors") as s:
        for k in s.keys():
            x, y = f.get(k), s.get(k)
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k
