"""Size-budgeted extraction (rank mode "budget", `extract --size`) and kohya's dynamic rank modes
(sv_ratio, sv_fro, sv_cumulative): the allocation, its file size, its error against uniform ranks of the
same size, and kohya's definitions on constructed spectra."""

from __future__ import annotations

import math

import pytest
import torch

from weightsmith.cli import main as cli_main
from weightsmith.lora.budget import LayerSpectrum, allocate, parse_size, uniform_rank_for
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import save_lora
from weightsmith.lora.svd import OptionError, RankPolicy, kohya_rank, low_rank
from weightsmith.safetensors_io import write_safetensors
from weightsmith.testmodels import FluxConfig, flux_state_dict

CFG = FluxConfig()  # hidden 64, mlp 256


def _known(m: int, n: int, s: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    u = torch.linalg.qr(torch.randn(m, len(s), generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=g)).Q
    return (u * s) @ v.T


@pytest.fixture(scope="module")
def varied_pair():
    """A Flux-shaped base and a fine-tune whose layers change with very different spectra: steep and flat
    decays, large and small norms (what a size budget should exploit)."""
    base = flux_state_dict(CFG, "dev", seed=0)
    tuned = {}
    g = torch.Generator().manual_seed(3)
    for i, (k, w) in enumerate(sorted(base.items())):
        if w.ndim == 2 and min(w.shape) >= 16:
            full = min(w.shape)
            decay = (0.3, 1.0, 2.0, 0.6)[i % 4]
            scale = (0.02, 0.1, 0.005, 0.05)[(i // 4) % 4]
            s = scale * torch.arange(1, full + 1, dtype=torch.float32) ** -decay
            tuned[k] = w + _known(w.shape[0], w.shape[1], s, g)
        else:
            tuned[k] = w + 0.01 * torch.randn(w.shape, generator=g)
    return base, tuned


def _total_sq_error(report) -> float:
    return sum((m.error * m.norm) ** 2 for m in report.modules)


def _size_of(lora, tmp_path, name: str) -> int:
    path = save_lora(lora, tmp_path / f"{name}.safetensors", fmt="comfy")
    return path.stat().st_size


def test_budget_lands_on_size_and_beats_the_best_uniform_rank(varied_pair, tmp_path):
    base, tuned = varied_pair
    _, full_report = extract_lora(base, tuned, rank=64)
    size = 160_000
    lora, report = extract_lora(base, tuned, rank_mode="budget", size=size)
    got = _size_of(lora, tmp_path, "budget")
    assert abs(got - size) <= 0.02 * size, (got, size)
    ranks = {m.key: m.rank for m in report.modules if m.status == "lowrank"}
    assert len(set(ranks.values())) > 3  # the layers got different ranks
    assert report.budget["ranks"] and "size budget" in report.text()
    budget_err = _total_sq_error(report)
    # the best uniform rank whose file is no larger: file size grows and the error falls with the rank, so
    # it is the largest rank that fits, found by walking from the allocator's own guess
    def uniform(r):
        lo, rep = extract_lora(base, tuned, rank=r)
        return _size_of(lo, tmp_path, f"u{r}"), _total_sq_error(rep)

    r = max(1, report.budget["uniform_rank"])
    size_r, err_r = uniform(r)
    while size_r > got and r > 1:
        r -= 1
        size_r, err_r = uniform(r)
    while True:
        size_next, err_next = uniform(r + 1)
        if size_next > got:
            break
        r, size_r, err_r = r + 1, size_next, err_next
    best = (r, err_r)
    assert size_r <= got
    assert budget_err <= best[1], (budget_err, best)
    assert budget_err < 0.9 * best[1]  # on different spectra the allocation gains clearly
    assert full_report.summary()["error_global"] < 1.0


def test_budget_allocation_is_greedy_and_never_worse_than_uniform():
    def sp(key, s, m=64, n=64):
        s = torch.tensor(s, dtype=torch.float64)
        return LayerSpectrum(key, m, n, len(s), float(s.square().sum()), s, complete=True)

    layers = [sp("steep", [10.0, 1.0, 0.1, 0.01]), sp("flat", [3.0, 3.0, 3.0, 3.0])]
    per = 128 * 2  # (m + n) bf16 values per rank
    alloc = allocate(layers, 4 * per, 2)
    assert alloc.ranks == {"steep": 1, "flat": 3} or alloc.ranks == {"steep": 2, "flat": 2}
    assert alloc.error_sq <= alloc.uniform_error_sq
    assert uniform_rank_for(layers, 4 * per, 2) == 2
    assert allocate(layers, per - 1, 2).ranks == {"steep": 0, "flat": 0}


def test_parse_size():
    assert parse_size("100MB") == 100_000_000
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("250k") == 250_000
    assert parse_size(1234) == 1234
    for bad in ("", "12 furlongs", "-5MB", "0"):
        with pytest.raises(OptionError):
            parse_size(bad)


def test_budget_too_small_for_the_fixed_part_is_refused(varied_pair):
    base, tuned = varied_pair
    with pytest.raises(OptionError, match="fixed part"):
        extract_lora(base, tuned, rank_mode="budget", size=1000)
    with pytest.raises(OptionError, match="needs a file size"):
        extract_lora(base, tuned, rank_mode="budget")


def test_cli_size_writes_a_file_of_that_size(varied_pair, tmp_path, capsys):
    base, tuned = varied_pair
    a, b = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    write_safetensors(a, base)
    write_safetensors(b, tuned)
    out = tmp_path / "lora.safetensors"
    assert cli_main(["extract", str(a), str(b), "-o", str(out), "--size", "150kB", "--modules"]) == 0
    text = capsys.readouterr().out
    assert "size budget 150.00 kB" in text
    assert abs(out.stat().st_size - 150_000) <= 0.02 * 150_000
    assert cli_main(["extract", str(a), str(b), "-o", str(tmp_path / "x.safetensors"), "--rank-mode", "budget"]) == 2


# ------------------------------------------------------------------------------------------- kohya modes


def kohya_reference(S: torch.Tensor, method: str, param: float, rank: int) -> int:
    """kohya sd-scripts networks/resize_lora.py (index_sv_* + rank_resize), transcribed for the test."""
    if method == "sv_ratio":
        index = int(torch.sum(S > S[0] / param).item()) - 1
    elif method == "sv_cumulative":
        index = int(torch.searchsorted(torch.cumsum(S, dim=0) / float(torch.sum(S)), param))
    else:
        sq = S.pow(2)
        index = int(torch.searchsorted(torch.cumsum(sq, dim=0) / float(torch.sum(sq)), param**2))
    new_rank = max(0, min(index, len(S) - 1)) + 1
    if S[0] <= 1e-6:
        return 1
    return min(new_rank, rank)


SPECTRA = [
    torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25]),
    torch.tensor([5.0, 4.9, 1.0, 0.9, 0.01, 0.0]),
    torch.tensor([1.0] * 10),
    1.0 / torch.arange(1, 41, dtype=torch.float64),
    torch.tensor([1e-7, 1e-8]),
]


@pytest.mark.parametrize("method,param", [("sv_ratio", 3.0), ("sv_ratio", 20.0), ("sv_ratio", 1.0),
                                          ("sv_cumulative", 0.5), ("sv_cumulative", 0.93),
                                          ("sv_fro", 0.7), ("sv_fro", 0.97), ("sv_fro", 1.0)])
@pytest.mark.parametrize("cap", [64, 3])
def test_kohya_modes_agree_with_kohya(method, param, cap):
    for s in SPECTRA:
        assert kohya_rank(s, method, param, cap) == kohya_reference(s.double(), method, param, cap), (s, method)


def test_kohya_modes_by_hand():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    assert kohya_rank(s, "sv_ratio", 3.0) == 2  # 8, 4 > 8/3
    assert kohya_rank(s, "sv_cumulative", 0.9) == 4  # 14/15.75 = 0.889 < 0.9 <= 15/15.75
    assert kohya_rank(s, "sv_fro", 0.99) == 3  # 80/85.31 = 0.938 < 0.99² <= 84/85.31 = 0.985
    assert kohya_rank(torch.tensor([1e-7, 1e-8]), "sv_fro", 0.5) == 1  # kohya's MIN_SV rule


@pytest.mark.parametrize("method,param", [("sv_ratio", 6.0), ("sv_fro", 0.95), ("sv_cumulative", 0.8)])
def test_low_rank_sv_modes_match_kohya_on_the_whole_spectrum(method, param):
    g = torch.Generator().manual_seed(0)
    s = 1.0 / torch.arange(1, 97, dtype=torch.float32) ** 0.8
    a = _known(200, 96, s, g)
    lr = low_rank(a, RankPolicy(method, rank=64, max_rank=None, dynamic_param=param))
    want = kohya_reference(torch.linalg.svdvals(a).double(), method, param, 10**6)
    assert lr.rank == want
    assert lr.method == ("exact" if method == "sv_cumulative" else lr.method)


def test_sv_modes_in_extraction_and_cli(varied_pair, tmp_path):
    base, tuned = varied_pair
    _, rep = extract_lora(base, tuned, rank_mode="sv_fro", dynamic_param=0.9, max_rank=32, dtype="fp32")
    for m in rep.modules:
        if m.status == "lowrank":
            delta = (tuned[m.key] - base[m.key]).reshape(m.shape[0], -1)
            want = kohya_reference(torch.linalg.svdvals(delta).double(), "sv_fro", 0.9, 32)
            assert abs(m.rank - want) <= 0, m.key
    with pytest.raises(OptionError, match="dynamic_param"):
        extract_lora(base, tuned, rank_mode="sv_ratio")
    with pytest.raises(OptionError, match="≥ 1"):
        extract_lora(base, tuned, rank_mode="sv_ratio", dynamic_param=0.5)
    assert not math.isnan(rep.summary()["error_global"])


def test_unchanged_diffs_give_their_bytes_to_the_ranks(varied_pair, tmp_path):
    base, tuned = varied_pair
    tuned = {k: (base[k] if v.ndim == 1 else v) for k, v in tuned.items()}  # biases and norms unchanged
    size = 120_000
    lora, report = extract_lora(base, tuned, rank_mode="budget", size=size)
    assert not any(m.diff is not None or m.diff_b is not None for m in lora.modules.values())
    got = _size_of(lora, tmp_path, "nodiff")
    assert abs(got - size) <= 0.02 * size, (got, size)
