"""The scaled-fp8 merge's executor reuses buffers and quantizes in parallel (issue 14): the same bytes as
computing each key fresh and in one pass."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith.merge import execute as merge_execute
from weightsmith.merge import merge

PREFIX = "model.diffusion_model."
SHAPES = [(3072, 512), (64, 64), (1536, 2048), (700, 300)]


def _write(path, seed: int, scaled: bool, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, shape in enumerate(SHAPES):
        w = torch.randn(shape, generator=g) * 0.05 * (i + 1)
        if scaled:
            s = w.abs().max() / torch.finfo(dtype).max
            sd[f"{PREFIX}blocks.{i}.weight"] = (w / s).to(dtype)
            sd[f"{PREFIX}blocks.{i}.scale_weight"] = s.reshape(1)
        else:
            sd[f"{PREFIX}blocks.{i}.weight"] = w.to(dtype)
        sd[f"{PREFIX}blocks.{i}.bias"] = torch.randn(shape[0], generator=g)
    if scaled:
        sd[f"{PREFIX}scaled_fp8"] = torch.empty(0, dtype=dtype)
    save_file(sd, str(path))


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k


def test_result_buffers_are_reused_and_never_shared():
    pool = merge_execute._ResultBuffers()
    y = pool.take(1000)
    other = pool.take(500)  # y is still lent: a different buffer
    assert y.numel() == 1000 and other.numel() == 500
    assert y.untyped_storage().data_ptr() != other.untyped_storage().data_ptr()
    pool.give_back(y)
    again = pool.take(800)  # fits in y's buffer
    assert again.numel() == 800 and again.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    pool.give_back(again)
    pool.give_back(other)
    big = pool.take(5000)  # grows: replaces the largest free buffer, so the pool keeps two
    assert big.numel() == 5000 and len(pool._free) == 1


def test_parallel_quantization_writes_the_same_bytes(tmp_path, monkeypatch):
    """Keys quantized in many ranges on two threads equal keys quantized in one pass on one, for the
    scaled-fp8 output kept from scaled inputs and for fp8_scaled from plain e5m2 inputs."""
    for scaled, dtype, out_dtype in [(True, torch.float8_e4m3fn, "keep"), (False, torch.float8_e5m2, "fp8_scaled")]:
        a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
        _write(a, 1, scaled, dtype)
        _write(b, 2, scaled, dtype)
        outs = []
        for elems, threads in [(1 << 30, 1), (100_003, 2)]:
            monkeypatch.setattr(merge_execute, "QUANT_ELEMS", elems)
            out = tmp_path / f"out_{elems}.safetensors"
            plan = merge_execute.plan_merge([str(a), str(b)], "weighted_sum", [0.3, 0.7])
            merge_execute.execute_merge(plan, out, dtype=out_dtype, threads=threads, overwrite=True)
            outs.append(_tensors(out))
        _same_bytes(*outs)
        assert outs[0][f"{PREFIX}blocks.2.weight"].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def test_plain_fp8_inputs_decode_exactly(tmp_path):
    """Plain fp8 row blocks go through the vectorised decoder: the fp32 merge equals torch's own
    conversion, bit for bit (row-blockwise keys and an in-place method's scratch buffers included)."""
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
        _write(a, 3, False, dtype)
        _write(b, 4, False, dtype)
        out = tmp_path / "out.safetensors"
        merge([str(a), str(b)], out, "weighted_sum", [0.25, 0.75], dtype="fp32", overwrite=True)
        got, ta, tb = _tensors(out), _tensors(a), _tensors(b)
        for k, x in ta.items():
            want = 0.25 * x.float() + 0.75 * tb[k].float()
            assert torch.equal(got[k], want), k
