"""The lossless mix's native route (core/mix_native.py) writes what the torch route writes and reports the
same shares: bf16 and fp32 models, scaled-fp8 and plain-e4m3 models mixed to their kept encoding, two and
three candidates, biased scales, both modes, ties; an input holding NaN is reported the same way by both."""

from __future__ import annotations

import pytest
import torch

from weightsmith.encodings import fp8_native
from weightsmith.mix import lossless_mix
from weightsmith.safetensors_io import StreamingWriter
from weightsmith.sources import open_model

E4M3 = torch.float8_e4m3fn
pytestmark = pytest.mark.skipif(fp8_native.library() is None, reason=f"native kernels {fp8_native.state()}")
KEYS = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_attn.norm.query_norm.scale"]


def _write(path, seed: int, base: dict, kind: str, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, t in base.items():
        w = t + 0.05 * torch.randn(t.shape, generator=g) if seed else t.clone()
        if k == KEYS[1] and seed:  # ties: equal distances to the reference on some elements
            w.view(-1)[:500] = t.view(-1)[:500] + (0.25 if seed % 2 else -0.25)
        if nan and k == KEYS[0]:
            w.view(-1)[7] = float("nan")
        tensors[k] = w
    plan, out = {}, {}
    if kind in ("scaled", "e4m3"):
        if kind == "scaled":
            plan["scaled_fp8"], out["scaled_fp8"] = ((2,), E4M3), torch.zeros(2, dtype=E4M3)
        for k, w in tensors.items():
            if w.ndim == 2:
                s = w.nan_to_num().abs().amax() / 448 if kind == "scaled" else torch.tensor(1.0)
                out[k] = (w / s).to(E4M3)
                if kind == "scaled":
                    out[k[:-len(".weight")] + ".scale_weight"] = s.reshape(())
            else:
                out[k] = w.to(torch.bfloat16)
    else:
        out = {k: w.to(torch.bfloat16 if kind == "bf16" else torch.float32) for k, w in tensors.items()}
    plan = {k: (tuple(t.shape), t.dtype) for k, t in out.items()}
    with StreamingWriter(path, plan) as w:
        for k, t in out.items():
            w.write(k, t)


def _models(tmp_path, kinds: list[str], nan: bool = False) -> list:
    g = torch.Generator().manual_seed(0)
    base = {KEYS[0]: torch.randn(96, 512, generator=g), KEYS[1]: torch.randn(128, 300, generator=g) * 3,
            KEYS[2]: torch.randn(128, generator=g)}
    paths = []
    for i, kind in enumerate(kinds):
        p = tmp_path / f"m{i}-{kind}.safetensors"
        _write(p, i, base, kind, nan=nan and i == 1)
        paths.append(p)
    return paths


def _both(tmp_path, monkeypatch, paths, **kw):
    calls = []
    mix = fp8_native.mix
    monkeypatch.setattr(fp8_native, "mix", lambda *a: calls.append(1) or mix(*a))
    fast = lossless_mix(paths[0], candidates=paths[1:], out=tmp_path / "fast.safetensors", **kw)
    assert calls, "the native route was not taken"
    monkeypatch.setattr(fp8_native, "library", lambda: None)
    slow = lossless_mix(paths[0], candidates=paths[1:], out=tmp_path / "slow.safetensors", **kw)
    with open_model(tmp_path / "fast.safetensors") as f, open_model(tmp_path / "slow.safetensors") as s:
        assert f.keys() == s.keys()
        for k in s.keys():
            assert f.info(k).dtype == s.info(k).dtype
            assert torch.equal(f.get(k).view(torch.uint8), s.get(k).view(torch.uint8)), k
    assert repr(fast.rows) == repr(slow.rows)  # (nan where no full statistics were asked for)
    return fast


@pytest.mark.parametrize("kinds", [["bf16"] * 3, ["f32"] * 3, ["scaled", "scaled", "e4m3"], ["bf16", "bf16", "bf16", "bf16"]])
@pytest.mark.parametrize("mode", ["min", "max"])
def test_native_mix_equals_the_torch_route(tmp_path, monkeypatch, kinds, mode):
    scales = [1.0, 0.9, 1.1][:len(kinds) - 1]
    _both(tmp_path, monkeypatch, _models(tmp_path, kinds), scales=scales, mode=mode)


def test_native_mix_reports_an_input_nan_like_the_torch_route(tmp_path, monkeypatch):
    """A candidate's NaN is its own stored value (a lossless mix may pick it): both routes write the same
    bytes and name the input and key that hold it."""
    paths = _models(tmp_path, ["bf16"] * 3, nan=True)
    calls = []
    mix = fp8_native.mix
    monkeypatch.setattr(fp8_native, "mix", lambda *a: calls.append(1) or mix(*a))
    fast = lossless_mix(paths[0], candidates=paths[1:], out=tmp_path / "fast.safetensors")
    monkeypatch.setattr(fp8_native, "library", lambda: None)
    slow = lossless_mix(paths[0], candidates=paths[1:], out=tmp_path / "slow.safetensors")
    assert calls and fast.nonfinite == slow.nonfinite == {str(paths[1]): [KEYS[0]]}
    with open_model(tmp_path / "fast.safetensors") as f, open_model(tmp_path / "slow.safetensors") as s:
        for k in s.keys():
            assert torch.equal(f.get(k).view(torch.uint8), s.get(k).view(torch.uint8)), k
