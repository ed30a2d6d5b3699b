"""Broken and hostile weight files at every entry point, through the core API and the CLI.

Every case of tests/reliability_cases.py (truncated, corrupt header, header past the end, duplicate keys,
zero length, a directory, pickle payloads in .ckpt and .pt, an unsupported dtype, a huge declared shape)
is given to merge, extract, validate (as model and as LoRA), convert, inspect, verify, compose, rerank and
mix: each must exit 2 with `error: ` naming the file and saying what to do, write nothing (no output,
no report, no temp file) and run no pickled code. tests/test_io.py tests the same files against the
reader itself; this file tests that no entry point goes around it. NaN/Inf weights are reported (or
refused with the strict `nonfinite="error"` policy), never turned into a crash.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reliability_cases import HOSTILE_FILES, MARKER, assert_actionable, folder_state
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith.cli import main as cli_main
from weightsmith.errors import BadFileError, UnsafePickleError, WeightsmithError
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import load_lora, save_lora
from weightsmith.lora.testloras import flux_block_linears, random_lora
from weightsmith.lora.validate import validate_lora
from weightsmith.merge.execute import merge
from weightsmith.mix import lossless_mix
from weightsmith.sources import open_model
from weightsmith.testmodels import FluxConfig, finetune, flux_shapes, flux_state_dict

NAN_KEY = "double_blocks.0.img_attn.qkv.weight"
INF_KEY = "single_blocks.0.linear2.weight"


@dataclass
class Work:
    dir: Path
    base: Path
    tuned: Path
    other: Path
    lora: Path
    nan_model: Path
    nan_lora: Path
    nan_lora_key: str


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Work:
    d = tmp_path_factory.mktemp("reliability_files")
    base = flux_state_dict(FluxConfig(), "dev", seed=1)
    files = {}
    for name, sd in (("base", base), ("tuned", finetune(base, seed=2, rank=4, scale=0.05)),
                     ("other", finetune(base, seed=3, rank=4, scale=0.05))):
        files[name] = d / f"{name}.safetensors"
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(files[name]))
    nan = {k: v.to(torch.bfloat16) for k, v in finetune(base, seed=2, rank=4, scale=0.05).items()}
    nan[NAN_KEY] = nan[NAN_KEY].clone()
    nan[NAN_KEY][0, 0] = float("nan")
    nan[INF_KEY] = nan[INF_KEY].clone()
    nan[INF_KEY][1, 1] = float("inf")
    save_file(nan, str(d / "nan_model.safetensors"))
    lora = random_lora(flux_shapes(FluxConfig(), "dev"), "flux", rank=4, seed=5, targets=flux_block_linears)
    save_lora(lora, d / "lora.safetensors", fmt="comfy")
    with safe_open(str(d / "lora.safetensors"), "pt") as f:
        lsd = {k: f.get_tensor(k) for k in f.keys()}
    nan_lora_key = "diffusion_model.double_blocks.0.img_attn.proj.lora_up.weight"
    lsd[nan_lora_key] = lsd[nan_lora_key].clone()
    lsd[nan_lora_key][0, 0] = float("nan")
    save_file(lsd, str(d / "nan_lora.safetensors"))
    return Work(d, files["base"], files["tuned"], files["other"], d / "lora.safetensors",
                d / "nan_model.safetensors", d / "nan_lora.safetensors", nan_lora_key)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# entry point -> argv with the hostile file in its place (models where a model goes, LoRAs where a LoRA goes)
ENTRY_POINTS = {
    "merge": lambda w, bad, out: ["merge", w.base, bad, "-o", out / "m.safetensors", "--report", out / "m.json"],
    "merge_as_A": lambda w, bad, out: ["merge", bad, w.base, "-o", out / "m.safetensors"],
    "extract": lambda w, bad, out: ["extract", w.base, bad, "-o", out / "e.safetensors", "--report", out / "e.json"],
    "validate_model": lambda w, bad, out: ["validate", bad, w.tuned, w.lora, "--report", out / "v.json"],
    "validate_lora": lambda w, bad, out: ["validate", w.base, w.tuned, bad, "--chart", out / "v.png"],
    "convert": lambda w, bad, out: ["convert", bad, "-o", out / "c.safetensors", "--report", out / "c.json"],
    "inspect": lambda w, bad, out: ["inspect", bad, "--json", out / "i.json"],
    "verify": lambda w, bad, out: ["verify", bad, "--arch", "flux"],
    "compose": lambda w, bad, out: ["compose", w.lora, bad, "-o", out / "co.safetensors", "--report", out / "co.json"],
    "rerank": lambda w, bad, out: ["rerank", bad, "--rank", "2", "-o", out / "r.safetensors"],
    "mix": lambda w, bad, out: ["mix", w.base, w.tuned, bad, "-o", out / "x.safetensors", "--report", out / "x.json"],
    "mix_reference": lambda w, bad, out: ["mix", bad, w.base, w.tuned, "-o", out / "x.safetensors"],
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_cli_refuses_hostile_file_clearly_and_writes_nothing(work, tmp_path, capsys, entry, case):
    bad = HOSTILE_FILES[case](tmp_path, work.base)
    out = tmp_path / "out"
    out.mkdir()
    before = folder_state(tmp_path, work.dir)
    rc, stdout, err = run_cli(capsys, *ENTRY_POINTS[entry](work, bad, out))
    assert rc == 2, f"exit {rc}\nstdout: {stdout}\nstderr: {err}"
    assert err.startswith("error: ") and "Traceback" not in err
    assert_actionable(err, bad)
    if case.startswith("pickle"):
        assert "refused" in err
    assert not (tmp_path / MARKER).exists(), "pickled code ran"
    assert folder_state(tmp_path, work.dir) == before, "something was written"


# core API -> a call with the hostile file in the place of a model or a LoRA
CORE_CALLS = {
    "merge": lambda w, bad, out: merge([w.base, bad], out),
    "extract_lora": lambda w, bad, out: extract_lora(w.base, bad),
    "validate_lora_model": lambda w, bad, out: validate_lora(w.base, bad, w.lora),
    "validate_lora_lora": lambda w, bad, out: validate_lora(w.base, w.tuned, bad),
    "load_lora": lambda w, bad, out: load_lora(bad),
    "lossless_mix": lambda w, bad, out: lossless_mix(w.base, w.tuned, bad, out=out),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
@pytest.mark.parametrize("call", sorted(CORE_CALLS))
def test_core_api_raises_bad_file_error(work, tmp_path, call, case):
    bad = HOSTILE_FILES[case](tmp_path, work.base)
    out = tmp_path / "out.safetensors"
    with pytest.raises(BadFileError) as e:
        CORE_CALLS[call](work, bad, out)
    if case.startswith("pickle"):
        assert isinstance(e.value, UnsafePickleError)
    assert_actionable(str(e.value), bad)
    assert not out.exists() and not (tmp_path / MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]  # no temp file either


@pytest.mark.parametrize("argv,case", [
    (["merge", "{base}", "{bad}", "-o", "{out}"], "pickle_ckpt"),
    (["compose", "{bad}", "-o", "{out}"], "pickle_pt"),
])
def test_real_process_exits_2_and_runs_no_pickle(work, tmp_path, argv, case):
    """The installed entry point as a user runs it: exit status 2, a one-line error, no code executed."""
    bad = HOSTILE_FILES[case](tmp_path, work.base)
    out = tmp_path / "out.safetensors"
    args = [a.format(base=work.base, bad=bad, out=out) for a in argv]
    r = subprocess.run([sys.executable, "-m", "weightsmith", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and "refused" in r.stderr and "Traceback" not in r.stderr
    assert_actionable(r.stderr, bad)
    assert not (tmp_path / MARKER).exists() and not out.exists()


# ------------------------------------------------------------------------------------------ NaN / Inf


def _finite(path: Path, key: str) -> bool:
    with safe_open(str(path), "pt") as f:
        return bool(f.get_tensor(key).float().isfinite().all())


def test_nan_in_merge_is_refused_when_writing_and_reported_by_a_dry_run(work, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    rc, stdout, err = run_cli(capsys, "merge", work.base, work.nan_model, "-o", out, "--report", tmp_path / "m.json")
    assert rc == 2, stdout  # a model with NaN/Inf weights is never written (issue 19), whatever the input policy
    assert NAN_KEY in err or INF_KEY in err
    assert_actionable(err, work.nan_model)
    assert list(tmp_path.iterdir()) == []
    rc, stdout, err = run_cli(capsys, "merge", work.base, work.nan_model, "--dry-run", "--report", tmp_path / "m.json")
    assert rc == 0, err  # a dry run writes no model: it lists every such key instead
    warning = next(line for line in stdout.splitlines() if "NaN/Inf" in line)
    assert NAN_KEY in warning and INF_KEY in warning and "inputs: B" in warning
    report = json.loads((tmp_path / "m.json").read_text())
    assert {k["key"] for k in report["nonfinite_keys"]} == {NAN_KEY, INF_KEY}
    # strict: the input source refuses to hand out the tensor, naming file and key; nothing is written
    strict_out = tmp_path / "strict.safetensors"
    with pytest.raises(BadFileError) as e:
        merge([work.base, open_model(work.nan_model, nonfinite="error")], strict_out)
    assert_actionable(str(e.value), work.nan_model)
    assert NAN_KEY in str(e.value) or INF_KEY in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_nan_in_mix_is_reported_and_strict_policy_refuses(work, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    rc, stdout, err = run_cli(capsys, "mix", work.base, work.tuned, work.nan_model, "-o", out)
    assert rc == 0, err
    warning = next(line for line in stdout.splitlines() if "NaN/Inf" in line)
    assert work.nan_model.name in warning and "2 tensors" in warning
    strict_out = tmp_path / "strict.safetensors"
    with pytest.raises(BadFileError) as e:
        lossless_mix(work.base, work.tuned, open_model(work.nan_model, nonfinite="error"), out=strict_out)
    assert_actionable(str(e.value), work.nan_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


@pytest.mark.parametrize("policy", ["error", "report"])
def test_nan_in_extract_and_validate_through_the_core(work, policy):
    """With the strict policy the read fails naming file and key. With the default one the NaN reaches the
    factorisation: it must come back as a WeightsmithError naming the key (or a report), not a LinAlgError."""
    for call in (lambda s: extract_lora(work.base, s, rank=4), lambda s: validate_lora(work.base, s, work.lora)):
        src = open_model(work.nan_model, nonfinite=policy)
        try:
            result = call(src)
        except WeightsmithError as e:
            assert_actionable(str(e), NAN_KEY if NAN_KEY in str(e) else INF_KEY)
            if policy == "error":
                assert str(work.nan_model) in str(e)
            continue
        report = result[1] if isinstance(result, tuple) else result
        text = report.text()
        assert NAN_KEY in text or INF_KEY in text, "NaN/Inf input neither refused nor reported"


@pytest.mark.parametrize("command", ["extract", "validate"])
def test_nan_model_in_extract_and_validate_cli_is_reported_or_refused(work, tmp_path, capsys, command):
    out = tmp_path / "e.safetensors"
    argv = (["extract", work.base, work.nan_model, "-o", out] if command == "extract"
            else ["validate", work.base, work.nan_model, work.lora])
    rc, stdout, err = run_cli(capsys, *argv)  # a LinAlgError escaping here fails the test with its traceback
    if rc == 2:
        assert_actionable(err, work.nan_model)
        assert NAN_KEY in err or INF_KEY in err
        assert not out.exists()
    else:
        assert rc == 0 and (NAN_KEY in stdout or INF_KEY in stdout), stdout


@pytest.mark.parametrize("argv", [["compose", "{lora}", "-o", "{out}"],
                                  ["compose", "{lora}", "--rank", "2", "-o", "{out}"],
                                  ["rerank", "{lora}", "--rank", "2", "-o", "{out}"]],
                         ids=["compose", "compose_rank", "rerank"])
def test_nan_lora_in_compose_and_rerank_is_reported_or_refused(work, tmp_path, capsys, argv):
    out = tmp_path / "o.safetensors"
    args = [a.format(lora=work.nan_lora, out=out) for a in argv]
    rc, stdout, err = run_cli(capsys, *args)  # a LinAlgError escaping here fails the test with its traceback
    if rc == 2:
        assert_actionable(err, work.nan_lora)
        assert "img_attn.proj" in err
        assert not out.exists()
    else:
        assert rc == 0 and "img_attn.proj" in stdout and re.search(r"\b(NaN|Inf|non-finite)\b", stdout), (
            "NaN written without a word:\n" + stdout[-1500:])


def test_nan_lora_convert_copies_values_and_inspect_reports_them(work, tmp_path, capsys):
    """convert is a remap: it moves factors without computing on them, so a NaN goes through unchanged
    (documented in formats.load_lora); `weightsmith inspect` is where values are scanned and reported."""
    out = tmp_path / "c.safetensors"
    rc, _, err = run_cli(capsys, "convert", work.nan_lora, "-o", out)
    assert rc == 0, err
    assert not _finite(out, work.nan_lora_key)
    rc, stdout, _ = run_cli(capsys, "inspect", work.nan_lora)
    assert rc == 0 and "WARNING: 1 tensors hold NaN or Inf" in stdout and work.nan_lora_key in stdout
