"""Pre-run estimates (`--plan-only`, the estimate line every run prints first) and the refusal of an
output that does not fit on its disk; the calibration cache; size budgets of compose and rerank."""

from __future__ import annotations

import json
import math

import pytest
import torch

from weightsmith import calibration, estimate
from weightsmith.cli import main as cli_main
from weightsmith.estimate_work import merge_estimate
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import save_lora
from weightsmith.merge import execute_merge, plan_merge
from weightsmith.safetensors_io import write_safetensors
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

FIXED = "elementwise=1e8,gemm=1e9,read=1e8,write=1e8"


@pytest.fixture(autouse=True)
def fixed_calibration(monkeypatch):
    monkeypatch.setenv("WEIGHTSMITH_CALIBRATION", FIXED)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("estimate")
    base = flux_state_dict(FluxConfig(), "dev", seed=0)
    tuned = finetune(base, seed=1, rank=4, scale=0.05, noise=0.02)
    other = finetune(base, seed=2, rank=4, scale=0.05, noise=0.02)
    paths = {}
    for name, sd in (("a", base), ("b", tuned), ("c", other)):
        paths[name] = folder / f"{name}.safetensors"
        write_safetensors(paths[name], {k: v.to(torch.bfloat16) for k, v in sd.items()})
    lora, _ = extract_lora(base, tuned, rank=16)
    paths["lora"] = save_lora(lora, folder / "lora.safetensors")
    lora2, _ = extract_lora(base, other, rank=16)
    paths["lora2"] = save_lora(lora2, folder / "lora2.safetensors")
    return paths


def _commands(files, out) -> dict[str, list[str]]:
    a, b, c, lo, lo2 = (str(files[k]) for k in ("a", "b", "c", "lora", "lora2"))
    return {
        "merge": ["merge", a, b, "-o", str(out)],
        "mix": ["mix", a, b, c, "-o", str(out)],
        "bake": ["bake", a, lo, "-o", str(out)],
        "extract": ["extract", a, b, "-o", str(out), "--rank", "8"],
        "compose": ["compose", lo, f"{lo2}:0.5", "-o", str(out)],
        "rerank": ["rerank", lo, "-o", str(out), "--rank", "4"],
    }


def test_estimate_fields_are_present_and_sane(files, tmp_path):
    out = tmp_path / "m.safetensors"
    plan = plan_merge([files["a"], files["b"]], "weighted_sum", [0.5, 0.5])
    est = merge_estimate(plan, out, "fp16", "cpu")
    d = est.to_dict()
    for field in ("output_bytes", "free_bytes", "peak_ram", "vram", "seconds", "parts", "device", "output"):
        assert field in d
    assert d["vram"] is None and d["device"] == "cpu"  # no VRAM on the CPU
    assert d["free_bytes"] > 0 and d["peak_ram"] > 0 and d["seconds"] > 0
    assert set(d["parts"]) == {"read", "compute", "write"}
    # the fixed calibration makes the time a pure function of the work: read 2 inputs at 1e8 B/s …
    read = sum(files[k].stat().st_size for k in "ab")
    assert est.parts["read"] == pytest.approx(read / 1e8, rel=0.02)  # (the tensor bytes: no header)
    execute_merge(plan, out, "fp16")
    assert est.output_bytes <= out.stat().st_size <= est.output_bytes * 1.05  # + the header
    text = est.text()
    assert "estimate (merge)" in text and "free disk" in text and "peak RAM" in text and "time ~" in text


def test_vram_is_estimated_on_a_gpu(files, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    plan = plan_merge([files["a"], files["b"]], "weighted_sum", [0.5, 0.5])
    est = merge_estimate(plan, tmp_path / "m.safetensors", None, "cuda")
    assert est.vram is not None and est.vram > 0 and "VRAM" in est.text()


@pytest.mark.parametrize("command", ["merge", "mix", "bake", "extract", "compose", "rerank"])
def test_plan_only_prints_the_estimate_and_writes_nothing(files, tmp_path, capsys, command):
    out = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli_main([*_commands(files, out)[command], "--plan-only"]) == 0
    text = capsys.readouterr().out
    assert f"estimate ({command})" in text and "free disk" in text and "peak RAM" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["merge", "mix", "bake", "extract", "compose", "rerank"])
@pytest.mark.parametrize("plan_only", [False, True])
def test_output_that_does_not_fit_is_refused_before_any_work(files, tmp_path, capsys, monkeypatch, command, plan_only):
    monkeypatch.setattr(estimate, "free_disk_bytes", lambda path: 50_000)
    out = tmp_path / "out.safetensors"
    rc = cli_main([*_commands(files, out)[command], *(["--plan-only"] if plan_only else [])])
    err = capsys.readouterr().err
    assert rc == 2
    assert "only 50.00 kB is free" in err and "needs about" in err and "Nothing was read or written" in err
    assert list(tmp_path.iterdir()) == []  # no output, no temp file


def test_every_run_prints_the_estimate_first(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert cli_main(["merge", str(files["a"]), str(files["b"]), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("estimate (merge)")
    assert out.exists()


def test_calibration_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.delenv("WEIGHTSMITH_CALIBRATION")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(calibration, "_memory", {})
    first = calibration.calibrate("cpu")
    assert first.elementwise_per_s > 0 and first.gemm_flops > 0 and first.write_bps > 0
    stored = json.loads(calibration.cache_file().read_text())
    assert len(stored) == 1 and next(iter(stored.values()))["gemm_flops"] == first.gemm_flops
    monkeypatch.setattr(calibration, "_memory", {})
    monkeypatch.setattr(calibration, "measure_gemm", lambda *a: pytest.fail("measured again"))
    assert calibration.calibrate("cpu") == first  # from the file
    assert not list(tmp_path.glob("weightsmith/.write-probe-*"))


def test_calibration_override_is_deterministic():
    cal = calibration.calibrate("cpu")
    assert (cal.elementwise_per_s, cal.gemm_flops, cal.read_bps, cal.write_bps) == (1e8, 1e9, 1e8, 1e8)


def _lowrank_sq_error(report) -> float:
    return sum(m.abs_error**2 for m in report.modules)


def test_rerank_size_lands_on_size_and_beats_uniform_ranks(files, tmp_path, capsys):
    from weightsmith.lora.compose import rerank_lora
    from weightsmith.lora.formats import load_lora

    size = 90_000
    out = tmp_path / "r.safetensors"
    assert cli_main(["rerank", str(files["lora"]), "-o", str(out), "--size", "90kB"]) == 0
    assert "size budget 90.00 kB" in capsys.readouterr().out
    got = out.stat().st_size
    assert abs(got - size) <= 0.02 * size
    lora = load_lora(files["lora"])
    _, budget = rerank_lora(lora, size=got, dtype=torch.bfloat16)
    best = None
    for r in range(1, 17):
        lo, rep = rerank_lora(lora, rank=r)
        if save_lora(lo, tmp_path / f"u{r}.safetensors", dtype=torch.bfloat16).stat().st_size > got:
            break
        best = _lowrank_sq_error(rep)
    assert best is not None and _lowrank_sq_error(budget) <= best * (1 + 1e-9)


def test_compose_size(files, tmp_path):
    out = tmp_path / "c.safetensors"
    assert cli_main(["compose", str(files["lora"]), f"{files['lora2']}:0.5", "-o", str(out), "--size", "120kB"]) == 0
    assert abs(out.stat().st_size - 120_000) <= 0.02 * 120_000
    assert cli_main(["compose", str(files["lora"]), "-o", str(tmp_path / "x.safetensors"), "--size", "1kB"]) == 2
    assert not math.isnan(out.stat().st_size)


def test_a_calibration_taken_on_a_busy_machine_is_measured_again_when_it_is_quieter(monkeypatch):
    import time

    from weightsmith import calibration

    fresh = {"measured": time.time(), "load": 0.5}
    busy = dict(fresh, load=100.0)
    monkeypatch.setattr(calibration, "_load", lambda: 1.0)
    assert not calibration._stale(fresh)
    assert calibration._stale(busy)  # measured at load 100, now 1: its speeds would make estimates too slow
    monkeypatch.setattr(calibration, "_load", lambda: 90.0)
    assert not calibration._stale(busy)  # still as busy: the measurement stands
    assert calibration._stale(dict(fresh, measured=time.time() - calibration.CACHE_SECONDS - 1))
