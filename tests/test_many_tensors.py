"""Models of very many tiny tensors (issue 19 item 9): what a merge keeps per key must stay small, so
memory grows by a few hundred bytes per tensor, not kilobytes. Checked by structure and by Python's own
allocation counts (tracemalloc: deterministic), never by timing; bench/bench_many_tensors.py measures
time and RSS against a plain safetensors copy.
"""

from __future__ import annotations

import gc
import json
import struct
import tracemalloc

import pytest
import torch
from safetensors import safe_open

from weightsmith.merge.execute import execute_merge
from weightsmith.merge.plan import KeyPlan, plan_merge
from weightsmith.merge.report import KeyStats
from weightsmith.safetensors_io import StreamingWriter, TensorInfo
from weightsmith.sources import open_model

N = 20_000


def _write(path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(N, 2, 2, generator=g)
    plan = {f"double_blocks.{i // 100}.img_attn.part_{i % 100}.weight": ((2, 2), torch.float32) for i in range(N)}
    with StreamingWriter(path, plan) as w:
        for i, k in enumerate(plan):
            w.write(k, data[i])


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    a, b = d / "a.safetensors", d / "b.safetensors"
    _write(a, 1)
    _write(b, 2)
    return a, b


def _traced(fn):
    """(result, bytes still allocated by `fn` once it returned and garbage was collected)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        gc.collect()
        return result, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_per_key_records_have_no_instance_dict():
    """One record per key, each without a __dict__ (a dict per object costs ~100-300 bytes)."""
    for cls in (TensorInfo, KeyPlan, KeyStats):
        assert hasattr(cls, "__slots__"), cls


def test_opening_and_planning_keep_a_few_hundred_bytes_per_key(many):
    a, b = many
    (src_a, src_b), opened = _traced(lambda: (open_model(a), open_model(b)))
    plan, planned = _traced(lambda: plan_merge([src_a, src_b]))
    assert len(plan.keys) == N
    # measured: ~290 bytes per key per file and ~350 per planned key (before: ~390 and ~630)
    assert opened / (2 * N) < 340, f"{opened / (2 * N):.0f} bytes per key and file to open"
    assert planned / N < 450, f"{planned / N:.0f} bytes per planned key"
    assert len({id(k.params) for k in plan.keys}) == 1  # one parameter dict shared by every key
    assert len({id(k.group) for k in plan.keys}) == N // 100  # one string per group


def test_a_merge_of_many_tiny_tensors_is_exact_and_reports_every_key(many, tmp_path):
    a, b = many
    out = tmp_path / "m.safetensors"
    calls = []
    report = execute_merge(plan_merge([a, b]), out, progress=lambda done, total: calls.append(done))
    assert len(report.key_stats) == N
    assert len({id(k.reads) for k in report.key_stats}) == 1  # one list of input labels shared by every key
    assert len(calls) <= 1002 and calls[-1] == N  # progress in 0.1% steps, not once per key
    with safe_open(str(out), "pt") as fo, safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        for k in list(fo.keys())[:: N // 50]:
            want = ((fa.get_tensor(k) + fb.get_tensor(k)) * 0.5)
            assert torch.equal(fo.get_tensor(k), want), k
    (n,) = struct.unpack("<Q", out.read_bytes()[:8])
    header = json.loads(out.read_bytes()[8:8 + n])  # N tensors and __metadata__
    assert len(header) == N + 1 and header["double_blocks.0.img_attn.part_1.weight"]["data_offsets"] == [16, 32]
