"""The fast CPU fp8 decoder (core/encodings/fp8.py) equals torch's own `q.to(float32) * scale` bit for bit:
every fp8 code of both kinds (NaN and e5m2's infinities included), with scales that are ordinary, tiny
(fp32 subnormal), huge (2^8 · s overflows), zero, negative, infinite or NaN; per tensor, per row and per
block; in one chunk, many chunks and across threads; and through the decoded source of a scaled-fp8 file."""

from __future__ import annotations

import pytest
import torch

from weightsmith.encodings import fp8
from weightsmith.encodings.base import apply_scale
from weightsmith.encodings.encode import ScaledRows, dequantize_fp8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
SCALES = [1.0, 3.7e-4, -0.013, 1e-40, 2.0**-149, 3e38, 1.7e36, 0.0, float("inf"), float("nan")]


def all_codes(dtype: torch.dtype, repeat: int = 1) -> torch.Tensor:
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(repeat).view(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as stored, NaN payloads aside (every NaN the same)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("scale", SCALES)
def test_every_code_with_every_kind_of_scale(dtype, scale):
    q = all_codes(dtype)
    s = torch.tensor(scale, dtype=torch.float32)
    assert same_bits(fp8.decode_fp8(q, s), q.to(torch.float32) * s)
    assert same_bits(fp8.decode_fp8(q), q.to(torch.float32))


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("how", ["row", "block"])
def test_row_and_block_scales_through_the_scaled_weight(dtype, how):
    from weightsmith.encodings.base import KeyEncoding, ScaledWeight

    q = all_codes(dtype, 16).reshape(64, 64)
    g = torch.Generator().manual_seed(3)
    shape = (64, 1) if how == "row" else (64, 4, 1)
    s = torch.randn(shape, generator=g).exp() * 1e-3
    s.view(-1)[:len(SCALES)] = torch.tensor(SCALES)  # every awkward scale on some rows
    enc = KeyEncoding("fp8_scaled", dtype, (64, 64), {}, shape)
    tensors = {"w": q, "s": s}
    got = ScaledWeight(enc, "w", "s", how).decode(tensors.__getitem__)
    want = apply_scale(q.to(torch.float32), s, how)
    assert same_bits(got, want)


def test_many_chunks_and_threads_match(monkeypatch):
    monkeypatch.setattr(fp8, "CHUNK_ELEMS", 1000)  # many chunks, a ragged last one
    monkeypatch.setattr(fp8, "PARALLEL_ELEMS", 4096)
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (97, 301), generator=g, dtype=torch.int32).to(torch.uint8).view(E4M3)
    s = torch.tensor(2.5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert fp8._threads(q.numel()) > 1
        assert same_bits(fp8.decode_fp8(q, s), q.to(torch.float32) * s)
    finally:
        torch.set_num_threads(threads)


def test_rows_views_and_noncontiguous_payloads():
    q = all_codes(E4M3, 8).reshape(32, 64)
    s = torch.tensor(0.02)
    rows = ScaledRows(q, s)
    assert same_bits(rows[3:9], q[3:9].float() * s)
    assert same_bits(rows.rows(5, 17, torch.device("cpu")), q[5:17].float() * s)
    t = q.t()  # not contiguous
    assert same_bits(fp8.decode_fp8(t, s), t.float() * s)
    assert same_bits(dequantize_fp8(q, s.reshape(1, 1)), q.float() * s)


def _decode_in_child(q) -> None:
    torch.set_num_threads(1)  # torch's own OpenMP pool is not fork-safe either: keep it out of the child
    s = torch.tensor(0.5)
    assert same_bits(fp8.decode_fp8(q, s), q.float() * s)


def test_thread_pool_is_made_anew_in_a_forked_child(monkeypatch):
    """A child forked after the parent decoded on threads must not wait on the parent's (absent) threads."""
    import multiprocessing as mp

    monkeypatch.setattr(fp8, "CHUNK_ELEMS", 1024)
    monkeypatch.setattr(fp8, "_threads", lambda numel: 2)  # the pool is used whatever torch's thread count
    q = all_codes(E4M3, 64)
    _decode_in_child(q)  # the parent's pool now exists
    assert fp8._pool is not None
    p = mp.get_context("fork").Process(target=_decode_in_child, args=(q,))
    p.start()
    p.join(120)
    if p.exitcode is None:
        p.kill()
    assert p.exitcode == 0


@pytest.mark.parametrize("scale", [1.0, 3.7e-4, 3e38])
def test_flush_to_zero_thread_takes_the_fp16_route(scale):
    """e4m3's small codes are fp32 subnormals on the fast route; a thread that flushes subnormals
    (torch.set_flush_denormal) decodes through fp16 instead, with the same bits as torch there."""
    q = all_codes(E4M3, 4)
    s = torch.tensor(scale, dtype=torch.float32)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        assert not fp8.keeps_subnormals()
        assert same_bits(fp8.decode_fp8(q, s), q.to(torch.float32) * s)
        assert same_bits(fp8.decode_fp8(q), q.to(torch.float32))
    finally:
        torch.set_flush_denormal(False)
    assert fp8.keeps_subnormals()
