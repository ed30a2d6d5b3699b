"""Every merge method against an independent reference (numpy, float64 unless a discrete choice must
see the same fp32 values), through the whole streaming file merge of small Flux-shaped models; TIES and
DARE reproducible from a seed."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from weightsmith.merge import derive_seed, merge
from weightsmith.merge.methods import METHODS, _top_k_mask
from weightsmith.safetensors_io import write_safetensors
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

CFG = FluxConfig(hidden=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and three fine-tunes (bf16 files, so inputs are exactly representable in fp32)."""
    d = tmp_path_factory.mktemp("merge_methods")
    base = flux_state_dict(CFG, "dev", seed=0, dtype=torch.bfloat16)
    sds = [base, finetune(base, seed=1, rank=4, scale=0.1), finetune(base, seed=2, rank=4, scale=0.1, noise=0.02),
           finetune(base, seed=3, rank=2, scale=0.2)]
    paths = []
    for i, sd in enumerate(sds):
        p = d / f"m{i}.safetensors"
        write_safetensors(p, sd)
        paths.append(p)
    return paths, [{k: v.double().numpy() for k, v in sd.items()} for sd in sds], d


def _merged(paths, out, method, **kw):
    merge([str(p) for p in paths], out, method, dtype="fp32", **kw)
    return {k: v.double().numpy() for k, v in load_file(out).items()}


def _close(got: dict, want: dict, rel: float):
    assert set(got) == set(want)
    for k in want:
        scale = max(float(np.abs(want[k]).max()), 1e-30)
        err = float(np.abs(got[k] - want[k]).max())
        assert err <= rel * scale, f"{k}: max error {err:g} > {rel:g} x {scale:g}"


def test_weighted_sum_n_models(models, tmp_path):
    paths, sds, _ = models
    w = [0.5, 0.2, 0.3]
    got = _merged(paths[:3], tmp_path / "o.safetensors", "weighted_sum", weights=w)
    _close(got, {k: sum(wi * sd[k] for wi, sd in zip(w, sds[:3])) for k in sds[0]}, 2e-7)
    # not normalised unless asked: weights 1,1 double the model
    got = _merged(paths[:2], tmp_path / "o2.safetensors", "weighted_sum", weights=[1, 1], params={"normalize": False})
    _close(got, {k: sds[0][k] + sds[1][k] for k in sds[0]}, 2e-7)
    # normalised by default
    got = _merged(paths[:2], tmp_path / "o3.safetensors", "weighted_sum", weights=[3, 1])
    _close(got, {k: 0.75 * sds[0][k] + 0.25 * sds[1][k] for k in sds[0]}, 2e-7)


def test_add_difference(models, tmp_path):
    paths, (a, b, c, _), _ = models
    got = _merged(paths[:3], tmp_path / "o.safetensors", "add_difference", params={"alpha": 0.7})
    _close(got, {k: a[k] + 0.7 * (b[k] - c[k]) for k in a}, 3e-7)


def test_train_difference(models, tmp_path):
    paths, (a, b, c, _), _ = models
    got = _merged(paths[:3], tmp_path / "o.safetensors", "train_difference", params={"alpha": 0.5})
    want = {}
    for k in a:
        dist_ab, diff_bc = np.abs(b[k] - a[k]), b[k] - c[k]
        total = np.abs(diff_bc) + dist_ab
        scale = np.divide(dist_ab, total, out=np.zeros_like(total), where=total != 0)
        want[k] = a[k] + 1.8 * 0.5 * np.sign(diff_bc) * np.abs(diff_bc) * scale
    _close(got, want, 1e-6)


def _ties_reference(base, others, weights, density, scale):
    """TIES written from the paper's description: argsort-based top-k (stable: earlier index first among
    equal magnitudes), elected sign of the weighted sum (0 -> +), disjoint weighted mean."""
    deltas = []
    for o in others:
        d = (o.astype(np.float32) - base.astype(np.float32)).reshape(-1)  # the same fp32 deltas
        k = int(density * d.size)
        order = np.argsort(-np.abs(d), kind="stable")
        kept = np.zeros_like(d)
        kept[order[:k]] = d[order[:k]]
        deltas.append(kept)
    total = np.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        total = total + (d * np.float32(w))  # the elected sign must see the same fp32 sum
    sign = np.where(total >= 0, 1.0, -1.0)
    num = sum(np.where(np.sign(d) == sign, d.astype(np.float64) * w, 0.0) for d, w in zip(deltas, weights))
    den = sum(np.where(np.sign(d) == sign, w, 0.0) for d, w in zip(deltas, weights))
    merged = num / np.where(den == 0, 1.0, den)
    return base + scale * merged.reshape(base.shape)


def test_ties(models, tmp_path):
    paths, sds, _ = models
    got = _merged(paths, tmp_path / "o.safetensors", "ties", weights=[1, 1.0, 0.5, 2.0],
                  params={"density": 0.3, "scale": 0.8})
    want = {k: _ties_reference(sds[0][k], [sd[k] for sd in sds[1:]], [1.0, 0.5, 2.0], 0.3, 0.8) for k in sds[0]}
    _close(got, want, 1e-6)


def test_top_k_mask_ties_go_to_lowest_index():
    x = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 2.0, 0.5])
    # k = 4: both 3s, then two of the three 2s (the earliest two)
    assert _top_k_mask(x, 4 / 7).tolist() == [False, True, True, True, True, False, False]
    assert int(_top_k_mask(torch.full((100,), 0.25), 0.37).sum()) == 37
    assert _top_k_mask(x, 1.0).all() and not _top_k_mask(x, 0.0).any()


def _dare_reference(base, others, weights, name, seed, p, rescale=True):
    key_seed = derive_seed(seed, name)
    out = base.copy()
    for i, (o, w) in enumerate(zip(others, weights), start=1):
        gen = torch.Generator().manual_seed(derive_seed(key_seed, "dare", i))
        keep = (torch.rand(base.shape, generator=gen) < (1 - p)).numpy()
        d = np.where(keep, o - base, 0.0)
        out = out + w * (d / (1 - p) if rescale else d)
    return out


def test_dare(models, tmp_path):
    paths, sds, _ = models
    got = _merged(paths[:3], tmp_path / "o.safetensors", "dare", weights=[1, 0.6, 0.4],
                  params={"drop_rate": 0.7, "seed": 42})
    want = {k: _dare_reference(sds[0][k], [sds[1][k], sds[2][k]], [0.6, 0.4], k, 42, 0.7) for k in sds[0]}
    _close(got, want, 1e-6)


def test_ties_and_dare_reproducible_from_seed(models, tmp_path):
    paths, sds, _ = models
    runs = [_merged(paths[:3], tmp_path / f"d{i}.safetensors", "dare", params={"drop_rate": 0.5, "seed": s})
            for i, s in enumerate((7, 7, 8))]
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k])
    big = "double_blocks.0.img_mlp.0.weight"
    assert not np.array_equal(runs[0][big], runs[2][big])
    # the mask of a key depends on its name and the seed only, not on which other keys are merged
    sub_sds = [{big: load_file(p)[big]} for p in paths[:3]]
    alone = merge(sub_sds, tmp_path / "alone.safetensors", "dare", params={"drop_rate": 0.5, "seed": 7}, dtype="fp32")
    assert alone.to_dict()["keys"]["merged"] == 1
    assert np.array_equal(load_file(tmp_path / "alone.safetensors")[big].double().numpy(), runs[0][big])
    # about drop_rate of each delta is dropped
    kept = np.mean((runs[0][big] - sds[0][big]) != 0)
    assert 0.7 < kept < 0.8  # two deltas each kept with p 0.5: 1 - 0.25
    t1 = _merged(paths, tmp_path / "t1.safetensors", "ties", params={"density": 0.2})
    t2 = _merged(paths, tmp_path / "t2.safetensors", "ties", params={"density": 0.2})
    assert all(np.array_equal(t1[k], t2[k]) for k in t1)


def _slerp_reference(a, b, t, thr=0.9995):
    fa, fb = a.reshape(-1), b.reshape(-1)
    na, nb = np.linalg.norm(fa), np.linalg.norm(fb)
    dot = float(np.clip(fa @ fb / (na * nb), -1, 1))
    if abs(dot) > thr:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def test_slerp(models, tmp_path):
    paths, (a, _, c, _), _ = models
    pair = [paths[0], paths[2]]
    got = _merged(pair, tmp_path / "o.safetensors", "slerp", weights=[0.3, 0.7])
    _close(got, {k: _slerp_reference(a[k], c[k], 0.7) for k in a}, 2e-6)
    ends = _merged(pair, tmp_path / "e.safetensors", "slerp", weights=[1, 0])
    _close(ends, a, 2e-7)
    # orthogonal unit vectors: the midpoint keeps unit norm (a lerp would shrink it to 0.707)
    m = METHODS["slerp"].fn([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], [0.5, 0.5])
    assert torch.allclose(m, torch.tensor([0.5**0.5, 0.5**0.5]), atol=1e-7)


def test_slerp_gives_the_same_bits_whatever_the_thread_count():
    # the file merge runs it on single-threaded workers or alone on all cores, the graph on ComfyUI's
    # threads: a BLAS dot would move the angle, and so every output bit, with the thread count
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(3 * 1 << 20, generator=g), torch.randn(3 * 1 << 20, generator=g)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(METHODS["slerp"].fn([a, b], [0.4, 0.6]))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outs[0].view(torch.int32), o.view(torch.int32)) for o in outs[1:])


def _comparative_reference(a, b, alpha, beta, gamma, seed, name):
    delta = np.abs(a - b)
    top = delta.max()
    if top == 0:
        return a
    w = (delta / top) if beta == 1 else (top - delta) / top
    w = np.clip(np.nan_to_num(w ** (1 / alpha - 1)), 0, 1)
    if gamma != 1:
        gen = torch.Generator().manual_seed(derive_seed(seed, name))
        coin = (torch.rand(a.shape, generator=gen).double().numpy() < w).astype(np.float64)
        w = coin + gamma * (w - coin)
    return a * (1 - w) + b * w


def test_comparative_interpolation(models, tmp_path):
    paths, (a, b, _, _), _ = models
    for alpha, beta in ((0.5, 0), (0.3, 0), (0.7, 1)):
        got = _merged(paths[:2], tmp_path / f"o{alpha}{beta}.safetensors", "comparative_interpolation",
                      params={"alpha": alpha, "beta": beta})
        _close(got, {k: _comparative_reference(a[k], b[k], alpha, beta, 1.0, 0, k) for k in a}, 1e-6)
    # the Bernoulli variant: seeded, and only when asked (gamma < 1)
    got = _merged(paths[:2], tmp_path / "r.safetensors", "comparative_interpolation",
                  params={"alpha": 0.5, "gamma": 0.25, "seed": 3})
    _close(got, {k: _comparative_reference(a[k], b[k], 0.5, 0, 0.25, 3, k) for k in a}, 1e-6)


def _dissimilar_reference(a, b, c, base, alpha, beta, gamma, mult):
    da, db = b - base, c - base
    if da.ndim >= 2:
        fa, fb = da.reshape(da.shape[0], -1), db.reshape(db.shape[0], -1)
        cos = (fa * fb).sum(1) / np.maximum(np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1), 1e-8)
        cos = cos.reshape(-1, *([1] * (da.ndim - 1)))
    else:
        cos = float(da @ db / max(np.linalg.norm(da) * np.linalg.norm(db), 1e-8))
    d = ((np.clip(cos, -1, 1) + 1) / 2) ** gamma
    return a + mult * (da + alpha * (db - da)) * (d + beta * ((1 - d) - d))


def test_add_dissimilar_on_deltas(models, tmp_path):
    paths, (base, b, c, a2), _ = models
    # base defaults to A: A + m·f(B − A, C − A)
    got = _merged(paths[:3], tmp_path / "o.safetensors", "add_dissimilar", params={"gamma": 2.0, "multiplier": 0.8})
    _close(got, {k: _dissimilar_reference(base[k], b[k], c[k], base[k], 0.5, 1.0, 2.0, 0.8) for k in base}, 2e-6)
    # a separate base (input D): A' + m·f(B − D, C − D); beta 0 selects what the deltas share
    four = [paths[3], paths[1], paths[2], paths[0]]
    got = _merged(four, tmp_path / "o4.safetensors", "add_dissimilar", params={"base": "D", "beta": 0.0})
    _close(got, {k: _dissimilar_reference(a2[k], b[k], c[k], base[k], 0.5, 0.0, 1.0, 1.0) for k in base}, 2e-6)


def test_result_and_report_do_not_depend_on_threads_or_blocks(models, tmp_path):
    """Worker count and block size change how rows are cut and who writes them, never the bytes of the
    output, nor the report's sums beyond the fp32 round-off of per-block sums (a whole-tensor fp32 dot
    moves ~1e-6 relative); torch's thread count and the garbage collector are restored after."""
    import gc

    from weightsmith.merge import execute_merge, plan_merge

    paths, _, _ = models
    plan = plan_merge([str(p) for p in paths[:3]], "weighted_sum")
    threads_before = torch.get_num_threads()
    runs = [execute_merge(plan, tmp_path / f"o{i}.safetensors", "bf16", stats="full", threads=t, chunk_elems=c)
            for i, (t, c) in enumerate([(1, 1 << 30), (2, 512), (4, 256), (3, 4096)])]
    assert torch.get_num_threads() == threads_before and gc.isenabled()
    def data(i: int) -> tuple[bytes, str]:  # tensor bytes and their recorded hash (titles and dates differ)
        raw = (tmp_path / f"o{i}.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        return raw[8 + n:], json.loads(raw[8:8 + n])["__metadata__"]["modelspec.hash_sha256"]

    first = data(0)
    assert first[1] == "0x" + hashlib.sha256(first[0]).hexdigest()
    for i, r in enumerate(runs[1:], 1):
        assert data(i) == first  # row blocks written out of order by several threads hash the same
        for a, b in zip(runs[0].key_stats, r.key_stats):
            assert a.name == b.name and a.sq == pytest.approx(b.sq, rel=1e-5) and a.change == pytest.approx(b.change, rel=1e-5)


def test_chunked_equals_whole(models, tmp_path):
    """Row blocks (what large tensors get) give bit-identical results to whole-tensor evaluation."""
    from weightsmith.merge import execute_merge, plan_merge

    paths, _, _ = models
    for method, n in (("weighted_sum", 3), ("add_difference", 3), ("train_difference", 3)):
        plan = plan_merge([str(p) for p in paths[:n]], method)
        small = execute_merge(plan, tmp_path / f"{method}_s.safetensors", "fp32", chunk_elems=256, threads=2)
        whole = execute_merge(plan, tmp_path / f"{method}_w.safetensors", "fp32", chunk_elems=1 << 30)
        sa, sb = load_file(small.out_path), load_file(whole.out_path)
        assert all(torch.equal(sa[k], sb[k]) for k in sa), method
    plan = plan_merge([str(p) for p in paths[:3]], "add_dissimilar")
    sa = load_file(execute_merge(plan, tmp_path / "ad_s.safetensors", "fp32", chunk_elems=256).out_path)
    sb = load_file(execute_merge(plan, tmp_path / "ad_w.safetensors", "fp32", chunk_elems=1 << 30).out_path)
    assert all(torch.allclose(sa[k], sb[k], rtol=1e-6, atol=1e-7) for k in sa)
