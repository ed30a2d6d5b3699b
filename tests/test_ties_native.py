"""TIES-merging in native passes (core/merge/ties_native.py) writes the torch route's bytes and report: bf16,
fp32 and scaled-fp8 models, two and three inputs, another base, densities 0, 0.2 and 1, weights that are
not 1, normalize off, many magnitudes equal at the threshold (bf16 deltas), plain and encoded outputs,
and an input NaN; a 2 x 1 GB-class key no longer needs the whole tensor's int64 temporaries."""

from __future__ import annotations

import pytest
import torch

from weightsmith.encodings import fp8_native
from weightsmith.merge import execute_merge, plan_merge
from weightsmith.safetensors_io import StreamingWriter
from weightsmith.sources import open_model

E4M3 = torch.float8_e4m3fn
pytestmark = pytest.mark.skipif(fp8_native.library() is None, reason=f"native kernels {fp8_native.state()}")
KEYS = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_attn.qkv.bias"]


def _write(path, seed: int, kind: str, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(0)
    base = {KEYS[0]: torch.randn(300, 512, generator=g), KEYS[1]: torch.randn(256, 301, generator=g) * 2,
            KEYS[2]: torch.randn(300, generator=g)}
    g = torch.Generator().manual_seed(seed)
    tensors = {k: t + (0.1 * torch.randn(t.shape, generator=g) if seed else 0) for k, t in base.items()}
    if nan:
        tensors[KEYS[0]].view(-1)[1234] = float("nan")
    out = {}
    if kind == "scaled":
        out["scaled_fp8"] = torch.zeros(2, dtype=E4M3)
        for k, w in tensors.items():
            if w.ndim == 2:
                s = w.nan_to_num().abs().amax() / 448
                out[k], out[k[:-len(".weight")] + ".scale_weight"] = (w / s).to(E4M3), s.reshape(())
            else:
                out[k] = w.to(torch.bfloat16)
    else:
        out = {k: w.to(torch.bfloat16 if kind == "bf16" else torch.float32) for k, w in tensors.items()}
    with StreamingWriter(path, {k: (tuple(t.shape), t.dtype) for k, t in out.items()}) as w:
        for k, t in out.items():
            w.write(k, t)


def _both(tmp_path, monkeypatch, paths, dtype=None, **kw):
    calls = []
    apply = fp8_native.library().ws_ties_apply
    monkeypatch.setattr(fp8_native.library(), "ws_ties_apply", lambda *a: calls.append(1) or apply(*a))
    outs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(fp8_native, "library", lambda: None)
        plan = plan_merge([open_model(p) for p in paths], "ties", **kw)
        out = tmp_path / f"{native}.safetensors"
        outs.append((execute_merge(plan, out, dtype=dtype), out))
    assert calls, "the native passes were not taken"
    (fast, f_out), (slow, s_out) = outs
    with open_model(f_out) as f, open_model(s_out) as s:
        assert f.keys() == s.keys()
        for k in s.keys():
            assert torch.equal(f.get(k).view(torch.uint8), s.get(k).view(torch.uint8)), k
    for a, b in zip(fast.key_stats, slow.key_stats):
        assert a.name == b.name and a.finite == b.finite
        if a.sq:  # sums in float64 here, torch's fp32 vecdot there: the same to fp32 accumulation
            assert a.sq == pytest.approx(b.sq, rel=1e-5, nan_ok=True) and a.dot == pytest.approx(b.dot, rel=1e-5, nan_ok=True)
            assert a.change == pytest.approx(b.change, rel=1e-4, abs=1e-6, nan_ok=True)
    return fast


@pytest.mark.parametrize("kind", ["bf16", "f32", "scaled"])
@pytest.mark.parametrize("density", [0.2, 0.0, 1.0])
def test_native_ties_equals_the_torch_route(tmp_path, monkeypatch, kind, density):
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for i, p in enumerate(paths):
        _write(p, i, kind)
    _both(tmp_path, monkeypatch, paths, weights=[1.0, 0.7, 1.3], params={"density": density})


@pytest.mark.parametrize("dtype, params", [("fp16", {"base": 1, "normalize": False, "scale": 0.8}),
                                           ("fp8_scaled", {"density": 0.3})])
def test_native_ties_other_base_no_normalize_and_dtypes(tmp_path, monkeypatch, dtype, params):
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for i, p in enumerate(paths):
        _write(p, i, "bf16")
    _both(tmp_path, monkeypatch, paths, dtype=dtype, params=params)


def test_native_ties_with_a_nan_input_does_what_the_torch_route_does(tmp_path, monkeypatch):
    paths = [tmp_path / f"{i}.safetensors" for i in range(2)]
    _write(paths[0], 0, "f32")
    _write(paths[1], 1, "f32", nan=True)
    _both(tmp_path, monkeypatch, paths)
