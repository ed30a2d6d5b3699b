"""The one streaming engine behind merge, lossless mix and bake (core/engine.py): every plan reads as the
same per-key shape (output key, shape, dtype, inputs read, function), and that shape is what the file
holds; one loop aborts a run on an error or interrupt (no file, no temp file, the sources' NaN/Inf
policies restored); the lossless pick's integer blend is torch.where bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith.bake import bake, plan_bake
from weightsmith.engine import KeyJob, largest, run_keys
from weightsmith.lora.formats import save_lora
from weightsmith.lora.testloras import random_lora
from weightsmith.merge import execute_merge, plan_merge
from weightsmith.mix import _select, lossless_mix, plan_mix
from weightsmith.safetensors_io import StreamingWriter
from weightsmith.sources import open_model
from weightsmith.testmodels import FluxConfig, finetune, flux_shapes, flux_state_dict

CFG = FluxConfig()


def _header(path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}


@pytest.fixture()
def trio(tmp_path):
    a = {k: v.to(torch.bfloat16) for k, v in flux_state_dict(CFG, "dev", seed=1).items()}
    paths = []
    for name, sd in (("a", a), ("b", finetune(a, seed=2)), ("c", finetune(a, seed=3))):
        paths.append(tmp_path / f"{name}.safetensors")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(paths[-1]))
    return paths


def test_every_plan_reads_as_the_engine_shape_and_the_file_holds_it(tmp_path, trio):
    a, b, c = trio
    plan = plan_merge([a, b], "weighted_sum", [0.5, 0.5], rules=[r"^final_layer\..*=drop"])
    specs = plan.output_specs()
    assert not any(s.key.startswith("final_layer.") for s in specs)
    assert {s.function for s in specs} == {"weighted_sum"}
    assert all(s.reads == ((0, s.key), (1, s.key)) for s in specs)
    execute_merge(plan, tmp_path / "m.safetensors")
    assert _header(tmp_path / "m.safetensors") == {s.key: (s.shape, s.dtype) for s in specs}

    with open_model(a) as sa, open_model(b) as sb, open_model(c) as sc:
        mix_specs = plan_mix(sa, [sb, sc]).output_specs("max")
    assert {s.function for s in mix_specs} == {"lossless_max"}
    assert all(len(s.reads) == 3 for s in mix_specs)
    lossless_mix(a, b, c, out=tmp_path / "x.safetensors", mode="max")
    assert _header(tmp_path / "x.safetensors") == {s.key: (s.shape, s.dtype) for s in mix_specs}

    lora = tmp_path / "l.safetensors"
    save_lora(random_lora(flux_shapes(CFG), "flux", rank=4, seed=1, scale=0.1), lora, fmt="comfy")
    bplan = plan_bake(a, [(lora, 0.5)])
    bake_specs = bplan.output_specs()
    assert {s.key for s in bake_specs if s.function == "bake"} == set(bplan.patches)
    bake(a, [(lora, 0.5)], tmp_path / "baked.safetensors")
    assert _header(tmp_path / "baked.safetensors") == {s.key: (s.shape, s.dtype) for s in bake_specs}
    big = largest(bake_specs)
    assert big is not None and big.nbytes == max(s.numel * 2 for s in bake_specs)


def test_an_error_in_a_task_aborts_the_run_and_restores_the_sources(tmp_path, trio):
    out = tmp_path / "o.safetensors"
    src = open_model(trio[0])
    assert src.nonfinite == "report"
    keys = src.keys()
    writer = StreamingWriter(out, {k: (src.info(k).shape, src.info(k).dtype) for k in keys})
    seen = []

    def task(k):
        if k == keys[3]:
            raise RuntimeError("boom")
        writer.write(k, src.get(k))

    def jobs():
        for k in keys:
            assert src.nonfinite == "ignore"  # outputs are checked instead of every read
            yield KeyJob([lambda k=k: task(k)], lambda results, k=k: seen.append(k))

    with pytest.raises(RuntimeError, match="boom"):
        run_keys(jobs(), len(keys), writer=writer, sources=[src])
    assert src.nonfinite == "report"
    assert seen == keys[:3]  # finishes ran in key order up to the failing key
    assert not out.exists() and list(tmp_path.glob("*.tmp*")) == [] and list(tmp_path.glob(".*")) == []


def test_an_interrupt_from_progress_leaves_no_file(tmp_path, trio):
    out = tmp_path / "o.safetensors"

    def stop(done, total):
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lossless_mix(*trio, out=out, progress=stop)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors", "c.safetensors"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_integer_blend_is_torch_where_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4099, generator=g).to(dtype)
    y = torch.randn(4099, generator=g).to(dtype)
    x[:4] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf")], dtype=torch.float64).to(dtype)
    y[:4] = torch.tensor([0.0, -float("nan"), 1.0, -0.0], dtype=torch.float64).to(dtype)
    take = torch.rand(4099, generator=g) > 0.5
    take[:4] = torch.tensor([True, True, True, False])
    want = torch.where(take, x, y)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[want.element_size()]
    got = _select(take, x, y, torch.empty_like(x))
    assert torch.equal(got.view(bits), want.view(bits))
    in_place = y.clone()
    _select(take, x, in_place, in_place)  # out may be the if-false operand itself
    assert torch.equal(in_place.view(bits), want.view(bits))


def test_follow_up_tasks_start_when_a_keys_tasks_are_done_and_errors_surface():
    """KeyJob.then: the second list of tasks starts on the workers once every first task is done (their
    results in task order), finish runs after both; an error in either fails the run; a failed first
    task starts no follow-up."""
    from weightsmith.pipeline import KeyPipeline

    log: list = []

    def then(results):
        log.append(("then", results))
        return [lambda: log.append("second-a"), lambda: log.append("second-b")]

    with KeyPipeline(2) as pipe:
        pipe.add([lambda: 1, lambda: 2, lambda: 3], lambda r: log.append(("finish", r)), then=then)
        pipe.add([], lambda r: log.append(("finish-empty", r)), then=lambda r: [lambda: log.append("only")])
    assert log[0] == ("then", [1, 2, 3])
    assert log.index(("finish", [1, 2, 3])) > max(log.index("second-a"), log.index("second-b"))
    assert log[-1] == ("finish-empty", []) and "only" in log

    def boom():
        raise ValueError("second phase failed")

    with pytest.raises(ValueError, match="second phase"), KeyPipeline(2) as pipe:
        pipe.add([lambda: 1], lambda r: None, then=lambda r: [boom])
    started = []

    def bad():
        raise KeyError("first")

    with pytest.raises(KeyError), KeyPipeline(2) as pipe:
        pipe.add([bad, lambda: 2], lambda r: None, then=lambda r: started.append(r) or [])
    assert not started


@pytest.mark.parametrize("positioned_io", [True, False])
def test_the_output_hash_follows_writes_in_any_order(tmp_path, monkeypatch, positioned_io):
    """modelspec.hash_sha256 is the data section's SHA-256 whatever order the parts arrive in (the hashing
    thread follows the contiguous written prefix), with empty tensors among them; an aborted writer
    stops its thread and leaves no file. Also where the OS has no pwrite/preadv (Windows): seek + write
    and seek + read under one lock."""
    import hashlib
    import os
    import random

    if not positioned_io:
        monkeypatch.delattr(os, "pwrite", raising=False)
        monkeypatch.delattr(os, "preadv", raising=False)

    from weightsmith.provenance import HASH_KEY, HASH_PENDING
    from weightsmith.safetensors_io import StreamingWriter, read_header

    plan = {"a": ((300, 1000), torch.float32), "empty": ((0,), torch.float32), "b": ((7,), torch.bfloat16),
            "c": ((5000, 1000), torch.uint8)}
    data = {k: (torch.rand(s) * 100).to(dt) for k, (s, dt) in plan.items()}
    parts = [(k, off) for k, step in (("a", 12_000), ("c", 1 << 20)) for off in range(0, data[k].nbytes, step)]
    random.Random(0).shuffle(parts)
    out = tmp_path / "o.safetensors"
    with StreamingWriter(out, plan, {HASH_KEY: HASH_PENDING}) as w:
        w.write("empty", data["empty"])
        for k, off in parts:
            flat = data[k].reshape(-1).view(torch.uint8)
            piece = flat[off:off + (12_000 if k == "a" else 1 << 20)]
            w.write_at(k, off, piece.view(data[k].dtype))
        w.write("b", data["b"])
    raw = out.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert w.sha256 == "0x" + hashlib.sha256(raw[8 + n:]).hexdigest()
    assert read_header(out).metadata[HASH_KEY] == w.sha256
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(RuntimeError), StreamingWriter(bad, plan, {HASH_KEY: HASH_PENDING}) as w:
        w.write("b", data["b"])
        raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]  # no output, no temp file


@pytest.mark.parametrize("hashed", [True, False])
def test_the_writer_starts_the_disk_writing_behind_the_written_prefix(tmp_path, monkeypatch, hashed):
    """The writer's follower thread asks the disk to write (sync_file_range) each stretch of the written
    prefix once: in order, page-aligned except the file's end, never past the contiguous prefix, every
    data byte covered, with or without the hash; the file is the one written."""
    import random

    import weightsmith.safetensors_io as sio
    from weightsmith.provenance import HASH_KEY, HASH_PENDING

    if sio._SYNC_FILE_RANGE is None:
        pytest.skip("no sync_file_range here (not Linux)")
    calls = []
    monkeypatch.setattr(sio, "start_writeback", lambda fd, pos, n: calls.append((pos, pos + n)))
    plan = {f"k{i}": ((3_000_001 + i,), torch.uint8) for i in range(8)}
    data = {k: torch.randint(0, 255, s, dtype=torch.uint8) for k, (s, _) in plan.items()}
    parts = [(k, off) for k in plan for off in range(0, data[k].numel(), 1 << 20)]
    random.Random(1).shuffle(parts)
    written: list[tuple[int, int]] = []
    out = tmp_path / "o.safetensors"
    with sio.StreamingWriter(out, plan, {HASH_KEY: HASH_PENDING} if hashed else {}) as w:
        for k, off in parts:
            w.write_at(k, off, data[k][off:off + (1 << 20)])
            start = w._data_start + w._offsets[k] + off
            written.append((start, start + min(1 << 20, data[k].numel() - off)))
            frontier = w._data_start  # the contiguous prefix written so far
            for a, b in sorted(written):
                if a != frontier:
                    break
                frontier = b
            assert all(b <= frontier for _, b in calls)  # only bytes written, and no gap before them
        start = w._data_start
    assert calls[0][0] == start and calls[-1][1] == w.total_bytes
    assert all(a == b for (_, a), (b, _) in zip(calls, calls[1:]))  # contiguous, each byte once
    assert all(b % 4096 == 0 for _, b in calls[:-1])  # whole pages while more is to come
    with safe_open(out, "pt") as f:
        assert all(torch.equal(f.get_tensor(k), data[k]) for k in plan)
    assert (w.sha256 is not None) == hashed


def test_prefetch_asks_for_the_keys_bytes_and_never_fails(tmp_path, monkeypatch):
    """Sources read a key's bytes ahead when asked (posix_fadvise WILLNEED on its range; the merge asks
    for the next key's inputs), a decoded source asks for its payload, and a hint never raises."""
    import os

    from weightsmith.safetensors_io import StreamingWriter
    from weightsmith.sources import open_model

    path = tmp_path / "m.safetensors"
    q = torch.randn(64, 64).to(torch.float8_e4m3fn)
    tensors = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn), "x.weight": q,
               "x.scale_weight": torch.tensor(0.01), "x.bias": torch.randn(64)}
    with StreamingWriter(path, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}) as w:
        for k, t in tensors.items():
            w.write(k, t)
    calls = []
    if hasattr(os, "posix_fadvise"):
        real = os.posix_fadvise
        monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: calls.append((off, n, advice)) or
                            real(fd, off, n, advice))
    with open_model(path) as src:
        src.prefetch("x.weight")  # decoded: the fp8 payload's 4096 bytes
        src.prefetch("x.bias")
        src.prefetch("no such key")
        assert torch.equal(src.get("x.bias"), tensors["x.bias"])
    if hasattr(os, "posix_fadvise"):
        assert [(n, a) for _, n, a in calls] == [(4096, os.POSIX_FADV_WILLNEED), (256, os.POSIX_FADV_WILLNEED)]
