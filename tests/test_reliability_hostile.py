"""Hostile and unusual inputs that used to give silently wrong results or change an input (issue 19,
item 5, and the torch-checkpoint parts of items 6 and 8), through the real CLI process
(`python -m weightsmith …`, as a user runs it).

Each case either gives the documented correct result (checked on values) or exits 2 with one `error:`
line naming the file and key and saying what to do; never a traceback, never an output file after a
refusal, and every input byte-identical before and after (sha256). docs/reliability.md lists each case.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from reliability_cases import assert_actionable
from safetensors.torch import load_file, save_file

from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

IMG_W, IMG_B = "img_in.weight", "img_in.bias"


def weightsmith(*args) -> subprocess.CompletedProcess:
    """The CLI in a fresh process (PYTHONPATH is inherited, so the code under test runs)."""
    return subprocess.run([sys.executable, "-m", "weightsmith", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def digests(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (followed through symlinks): inputs must never change."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(r: subprocess.CompletedProcess, *names, out: Path | None = None) -> None:
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert_actionable(r.stderr, *names)
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.*.tmp"))


@pytest.fixture(scope="module")
def d(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    a = flux_state_dict(FluxConfig(), "dev", seed=1)
    save_file(a, str(d / "a.safetensors"))
    for i in range(1, 8):
        save_file(finetune(a, seed=10 + i), str(d / f"b{i}.safetensors"))
    return d


def sd(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ------------------------------------------------------------------ tensors under a trainer's container

CONTAINERS = {  # how trainers save: the state dict under a key, nested, or with DataParallel's prefix
    "model": lambda s: {"model": s, "epoch": 3},
    "module": lambda s: {"module": s},
    "ema": lambda s: {"ema": s, "step": 100},
    "state_dict": lambda s: {"state_dict": s, "global_step": 7, "optimizer_states": [{"lr": 1e-4}]},
    "model_state_dict": lambda s: {"model_state_dict": s, "optimizer_state_dict": {"state": {}}},
    "nested twice": lambda s: {"state_dict": {"model": s}, "epoch": 1},
    "DataParallel": lambda s: {f"module.{k}": v for k, v in s.items()},
}


def test_tensors_under_trainer_containers_are_read_and_the_key_is_named(d, tmp_path):
    """Each B saved as a trainer would: merged values equal the merge of the same B's as safetensors, and
    the plan names where each B's tensors were found (before: B contributed nothing, output = A)."""
    wrapped = []
    for i, wrap in enumerate(CONTAINERS.values(), start=1):
        p = tmp_path / f"b{i}.pt"
        torch.save(wrap(sd(d / f"b{i}.safetensors")), p)
        wrapped.append(p)
    before = digests(tmp_path, d)
    out, ref = tmp_path / "out.safetensors", tmp_path / "ref.safetensors"
    r = weightsmith("merge", d / "a.safetensors", *wrapped, "-o", out)
    assert r.returncode == 0, r.stderr
    assert weightsmith("merge", d / "a.safetensors", *(d / f"b{i}.safetensors" for i in range(1, 8)),
                       "-o", ref).returncode == 0
    got, want = sd(out), sd(ref)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got[IMG_W], sd(d / "a.safetensors")[IMG_W])
    for where in ("['model']", "['module']", "['ema']", "['state_dict']", "['model_state_dict']",
                  "['state_dict']['model']", "'module.' (DataParallel)"):
        assert where in r.stdout, r.stdout
    assert digests(tmp_path, d).items() >= before.items()


def test_inspect_names_the_container_and_what_was_not_read(d, tmp_path):
    p = tmp_path / "both.pt"
    torch.save({"model": sd(d / "b1.safetensors"), "ema": sd(d / "b2.safetensors")}, p)
    r = weightsmith("inspect", p)
    assert r.returncode == 0, r.stderr
    assert "tensors read from the checkpoint entry ['model']" in r.stdout and "not read: ['ema']" in r.stdout
    assert "flux-dev" in r.stdout


def test_inputs_that_share_no_key_are_refused_naming_the_files(d, tmp_path):
    """Keys under a prefix no rule strips (`backbone.`): merge and mix refuse instead of writing A again."""
    p = tmp_path / "renamed.pt"
    torch.save({f"backbone.{k}": v for k, v in sd(d / "b1.safetensors").items()}, p)
    before = digests(tmp_path, d)
    out = tmp_path / "out.safetensors"
    assert_refused(weightsmith("merge", d / "a.safetensors", p, "-o", out), p, "a.safetensors", out=out)
    assert_refused(weightsmith("mix", d / "a.safetensors", p, d / "b2.safetensors", "-o", out), p, out=out)
    assert digests(tmp_path, d) == before


# ------------------------------------------------------------------ storages shared between tensors


def _crafted_overlong_storage(folder: Path, donor: dict[str, torch.Tensor]) -> Path:
    """A torch zip whose pickle declares `img_in.bias`'s storage 16× longer than its record: memory-mapped,
    torch reads the next records' bytes as the tensor's values (other tensors, the zip directory)."""
    n = donor[IMG_B].numel()
    long = dict(donor)
    long[IMG_B] = torch.zeros(16 * n)[:n]  # a view: its storage (declared in the pickle) has 16n elements
    short = dict(donor)
    short[IMG_B] = donor[IMG_B].clone()
    torch.save(long, folder / "long.pt")
    torch.save(short, folder / "short.pt")
    out = folder / "crafted.pt"
    with zipfile.ZipFile(folder / "long.pt") as zl, zipfile.ZipFile(folder / "short.pt") as zs:
        writer = torch._C.PyTorchFileWriter(str(out))
        for name in zl.namelist():
            rel = name.split("/", 1)[1]
            if rel == ".data/serialization_id":
                continue  # the writer adds its own
            data = (zs if rel.startswith("data/") else zl).read(f"{zs.namelist()[0].split('/')[0]}/{rel}"
                                                                if rel.startswith("data/") else name)
            writer.write_record(rel, data, len(data))
        writer.write_end_of_file()
    return out


def test_storage_declared_longer_than_its_record_is_refused(d, tmp_path):
    bad = _crafted_overlong_storage(tmp_path, sd(d / "b1.safetensors"))
    before = digests(tmp_path, d)
    out = tmp_path / "out.safetensors"
    assert_refused(weightsmith("merge", d / "a.safetensors", bad, "-o", out), bad, IMG_B, out=out)
    assert_refused(weightsmith("inspect", bad), bad, IMG_B)
    assert digests(tmp_path, d) == before


def test_views_into_one_storage_are_read_exactly(d, tmp_path):
    """torch.save of slices, strided and overlapping views of one storage: merge and mix give exactly
    what the same values saved as separate tensors give."""
    b = sd(d / "b1.safetensors")
    total = sum(v.numel() for v in b.values())
    flat = torch.zeros(3 * total + 5)
    views, off = {}, 5
    for i, (k, v) in enumerate(b.items()):
        n = v.numel()
        if i % 3 == 0:  # every other element of the storage
            view = flat[off:off + 2 * n:2].view(v.shape) if v.dim() == 1 else flat.as_strided(
                v.shape, tuple(2 * s for s in v.contiguous().stride()), off)
            off += 2 * n
        elif i % 3 == 1 and v.dim() == 2:  # a transposed view
            view = flat[off:off + n].view(v.shape[1], v.shape[0]).t()
            off += n
        else:  # a plain slice
            view = flat[off:off + n].view(v.shape)
            off += n
        view.copy_(v)
        views[k] = view
    overlap = flat[7:7 + b[IMG_B].numel()]  # a second key viewing bytes another key also views
    views["extra.overlap"] = overlap
    torch.save(views, tmp_path / "views.pt")
    save_file({k: v.clone(memory_format=torch.contiguous_format) for k, v in views.items()},
              str(tmp_path / "copies.safetensors"))
    a = sd(d / "a.safetensors")
    a["extra.overlap"] = torch.zeros_like(overlap)
    save_file(a, str(tmp_path / "a.safetensors"))
    for cmd in (["merge"], ["mix"]):
        outs = []
        for src in ("views.pt", "copies.safetensors"):
            out = tmp_path / f"{cmd[0]}_{src}.safetensors"
            extra = [d / "b2.safetensors"] if cmd == ["mix"] else []
            r = weightsmith(*cmd, tmp_path / "a.safetensors", tmp_path / src, *extra, "-o", out)
            assert r.returncode == 0, r.stderr
            outs.append(sd(out))
        assert outs[0].keys() == outs[1].keys()
        assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[1]), cmd


# ------------------------------------------------------------------ one model, two namespaces


def test_a_layer_under_two_prefixes_is_refused_naming_both_keys(d, tmp_path):
    """`x` and `unet.x` in one file: merge (and mix) refuse, naming both keys (before: the output held both,
    105 keys from inputs of 52)."""
    stray = sd(d / "b1.safetensors")
    stray["unet." + IMG_B] = stray[IMG_B].clone()
    p = tmp_path / "twins.safetensors"
    save_file(stray, str(p))
    before = digests(tmp_path, d)
    out = tmp_path / "out.safetensors"
    for argv in (["merge", d / "a.safetensors", p], ["merge", p, d / "a.safetensors"],
                 ["mix", d / "a.safetensors", p, d / "b2.safetensors"]):
        r = weightsmith(*argv, "-o", out)
        assert_refused(r, p, IMG_B, "unet." + IMG_B, out=out)
    assert digests(tmp_path, d) == before


def test_a_stray_prefixed_key_is_read_as_the_models_own_and_reported(d, tmp_path):
    """One key saved as `unet.x` beside bare keys (no bare `x`): the model is the bare namespace, the stray
    key is matched as `x` and the plan says so; the output holds no `unet.` key."""
    stray = sd(d / "b1.safetensors")
    stray["unet." + IMG_B] = stray.pop(IMG_B)
    p = tmp_path / "stray.safetensors"
    save_file(stray, str(p))
    out, ref = tmp_path / "out.safetensors", tmp_path / "ref.safetensors"
    r = weightsmith("merge", d / "a.safetensors", p, "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"unet.{IMG_B} -> {IMG_B}" in r.stdout, r.stdout
    assert weightsmith("merge", d / "a.safetensors", d / "b1.safetensors", "-o", ref).returncode == 0
    got, want = sd(out), sd(ref)
    assert sorted(got) == sorted(want) and len(got) == 52
    assert all(torch.equal(got[k], want[k]) for k in want)
    mixed = tmp_path / "mixed.safetensors"
    r = weightsmith("mix", p, d / "a.safetensors", d / "b2.safetensors", "-o", mixed)
    assert r.returncode == 0 and "52 keys mixed" in r.stdout, r.stdout + r.stderr
    assert "unet." + IMG_B in sd(mixed) and IMG_B not in sd(mixed)  # mix keeps the reference's own names


# ------------------------------------------------------------------ never over (or among) a sharded input


@pytest.fixture
def sharded(d, tmp_path) -> Path:
    """b1 split in two shards with an index, in its own folder."""
    b = sd(d / "b1.safetensors")
    keys = sorted(b)
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for i, part in enumerate((keys[:26], keys[26:]), start=1):
        name = f"model-0000{i}-of-00002.safetensors"
        save_file({k: b[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_output_over_an_index_or_shard_is_refused_with_or_without_overwrite(d, sharded, tmp_path):
    index = sharded / "model.safetensors.index.json"
    shard = sharded / "model-00001-of-00002.safetensors"
    (tmp_path / "to_index.safetensors").symlink_to(index)
    (tmp_path / "to_shard.safetensors").symlink_to(shard)
    os.link(sharded / "model-00002-of-00002.safetensors", tmp_path / "hard.safetensors")
    before = digests(tmp_path, d)
    a, b2 = d / "a.safetensors", d / "b2.safetensors"
    cases = [("mix", index, index, True), ("merge", sharded, index, False),  # the index itself
             ("mix", sharded, tmp_path / "to_index.safetensors", True),  # a symlink to it
             ("merge", index, tmp_path / "to_shard.safetensors", True),  # a symlink to a shard
             ("mix", index, tmp_path / "hard.safetensors", True), ("merge", sharded, tmp_path / "hard.safetensors", False)]
    for command, given, target, overwrite in cases:
        argv = [command, a, given, *([b2] if command == "mix" else []), "-o", target]
        r = weightsmith(*argv, *(["--overwrite"] if overwrite else []))
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, (argv, r.stderr)
    assert digests(tmp_path, d) == before


def test_core_api_never_writes_over_an_index_even_with_overwrite(d, sharded):
    """The check is the writer's, not only the CLI's: lossless_mix and merge given the index as `out`."""
    from weightsmith.errors import OutputPathError
    from weightsmith.merge.execute import execute_merge
    from weightsmith.merge.plan import plan_merge
    from weightsmith.mix import lossless_mix

    index = sharded / "model.safetensors.index.json"
    before = digests(sharded)
    with pytest.raises(OutputPathError, match="one of the inputs"):
        lossless_mix(d / "a.safetensors", candidates=[index, d / "b2.safetensors"], out=index, overwrite=True)
    with pytest.raises(OutputPathError, match="one of the inputs"):
        execute_merge(plan_merge([d / "a.safetensors", index]), index, overwrite=True)
    assert digests(sharded) == before


@pytest.mark.parametrize("given", ["folder", "index"])
def test_output_into_a_sharded_inputs_folder_is_refused(d, sharded, given):
    """A new .safetensors among the shards would make the folder unreadable ("shards overlap")."""
    inp = sharded if given == "folder" else sharded / "model.safetensors.index.json"
    before = digests(sharded, d)
    out = sharded / "merged.safetensors"
    if given == "folder":
        r = weightsmith("merge", d / "a.safetensors", inp, "-o", out)
        assert_refused(r, out, sharded, out=out)
        assert "shard" in r.stderr
        r = weightsmith("mix", d / "a.safetensors", inp, d / "b2.safetensors", "-o", out)
        assert_refused(r, out, out=out)
    else:
        r = weightsmith("extract", d / "a.safetensors", inp, "-o", out, "--rank", "2")
        assert_refused(r, out, sharded, out=out)
    assert digests(sharded, d) == before
    from weightsmith.sources import open_model

    assert len(open_model(sharded)) == 52  # still one readable model


# ------------------------------------------------------------------ output names we would not honour


@pytest.fixture(scope="module")
def lora(d) -> Path:
    from weightsmith.lora.formats import save_lora
    from weightsmith.lora.testloras import flux_block_linears, random_lora
    from weightsmith.testmodels import flux_shapes

    shapes = {k: tuple(s) for k, s in flux_shapes(FluxConfig(), "dev").items()}
    path = d / "lora.safetensors"
    save_lora(random_lora(shapes, "flux", rank=4, seed=5, targets=flux_block_linears), path, fmt="comfy")
    return path


def test_output_suffixes_we_do_not_write_are_refused(d, lora, tmp_path):
    """`-o out.ckpt` would hold safetensors bytes that torch.load (and this tool) then refuse as a pickle."""
    a, b1, b2 = d / "a.safetensors", d / "b1.safetensors", d / "b2.safetensors"
    before = digests(d)
    for suffix, argv in ((".ckpt", ["merge", a, b1]), (".ckpt", ["mix", a, b1, b2]),
                         (".pt", ["extract", a, b1, "--rank", "2"]), (".bin", ["convert", lora]),
                         (".ckpt", ["compose", f"{lora}:0.5"]), (".pth", ["rerank", lora, "--rank", "2"])):
        out = tmp_path / f"out{suffix}"
        r = weightsmith(*argv, "-o", out)
        assert_refused(r, out, out=out)
        assert ".safetensors" in r.stderr, r.stderr
    assert digests(d) == before


# ------------------------------------------------------------------ tensors no command can read as weights


def _with(d: Path, key: str, t: torch.Tensor, folder: Path, name: str) -> Path:
    s = sd(d / "b1.safetensors")
    s[key] = t
    p = folder / f"{name}.pt"
    torch.save(s, p)
    return p


def _bad_tensors() -> dict[str, tuple[str, torch.Tensor]]:
    w = torch.randn(64, 64)
    with warnings.catch_warnings():  # torch's notes on beta sparse CSR and deprecated quantization
        warnings.simplefilter("ignore")
        return {
            "sparse_coo": (IMG_W, w.to_sparse()),
            "sparse_csr": (IMG_W, w.to_sparse_csr()),
            "qint8": (IMG_W, torch.quantize_per_tensor(w, 0.01, 0, torch.qint8)),
            "complex64": (IMG_W, w.to(torch.complex64)),
            "uint16": (IMG_W, w.abs().to(torch.uint16)),
            "stride0_1e12": (IMG_W, torch.zeros(1).expand(10**6, 10**6)),
        }


@pytest.mark.parametrize("case", ["sparse_coo", "sparse_csr", "qint8", "complex64", "uint16", "stride0_1e12"])
def test_torch_zip_tensors_no_command_can_read_are_refused(d, tmp_path, case):
    """Before: tracebacks (sparse, qint8), a 4 TB allocation (mix of a stride-0 view) or an extract without
    end; now exit 2 naming file and key, before anything is allocated or written."""
    key, t = _bad_tensors()[case]
    bad = _with(d, key, t, tmp_path, case)
    before = digests(tmp_path, d)
    out = tmp_path / "out.safetensors"
    commands = {"sparse_coo": [["merge", d / "a.safetensors", bad]],
                "sparse_csr": [["mix", d / "a.safetensors", bad, d / "b2.safetensors"]],
                "qint8": [["extract", d / "a.safetensors", bad, "--rank", "2"], ["mix", d / "a.safetensors", bad,
                                                                                  d / "b2.safetensors"]],
                "complex64": [["merge", bad, d / "a.safetensors"]],
                "uint16": [["mix", bad, d / "a.safetensors", d / "b2.safetensors"]],
                "stride0_1e12": [["mix", bad, d / "a.safetensors", d / "b2.safetensors"],
                                 ["extract", d / "a.safetensors", bad, "--rank", "2"],
                                 ["merge", d / "a.safetensors", bad]]}[case]
    for argv in commands:
        assert_refused(weightsmith(*argv, "-o", out), bad, key, out=out)
    assert_refused(weightsmith("inspect", bad), bad, key)
    assert digests(tmp_path, d) == before


def test_zero_element_tensors_are_carried_through(d, tmp_path):
    """Zero-element tensors present in every input: merge, mix and extract succeed and write them with
    their shapes (before: mix failed with a traceback, 'planned tensors never written')."""
    paths = []
    for name in ("a", "b1", "b2"):
        s = sd(d / f"{name}.safetensors")
        s["extra.empty"], s["extra.empty2d"] = torch.zeros(0), torch.zeros(0, 64)
        torch.save(s, tmp_path / f"{name}.pt")
        paths.append(tmp_path / f"{name}.pt")
    before = digests(tmp_path, d)
    for argv in (["merge", paths[0], paths[1]], ["mix", *paths]):
        out = tmp_path / f"{argv[0]}.safetensors"
        r = weightsmith(*argv, "-o", out)
        assert r.returncode == 0, r.stderr
        got = sd(out)
        assert got["extra.empty"].shape == (0,) and got["extra.empty2d"].shape == (0, 64) and len(got) == 54
    r = weightsmith("extract", paths[0], paths[1], "-o", tmp_path / "lora.safetensors", "--rank", "2")
    assert r.returncode == 0, r.stderr
    assert digests(tmp_path, d).items() >= before.items()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_int_or_bool_where_a_float_weight_is_needed_is_refused(d, tmp_path, dtype):
    """extract from a tuned model whose weight is int/bool: refused naming file and key (before: a LoRA of
    the int-cast values, exit 0); merge refuses the same key; mix keeps a's tensor and says so."""
    w = sd(d / "b1.safetensors")[IMG_W]
    bad = _with(d, IMG_W, (w * 100).to(dtype), tmp_path, str(dtype).split(".")[-1])
    before = digests(tmp_path, d)
    out = tmp_path / "out.safetensors"
    assert_refused(weightsmith("extract", d / "a.safetensors", bad, "-o", out, "--rank", "2"), bad, IMG_W, out=out)
    assert_refused(weightsmith("merge", d / "a.safetensors", bad, "-o", out), bad, IMG_W, out=out)
    r = weightsmith("mix", d / "a.safetensors", bad, d / "b2.safetensors", "-o", out)
    assert r.returncode == 0 and f"kept {IMG_W}" in r.stdout, r.stdout + r.stderr
    assert torch.equal(sd(out)[IMG_W], sd(d / "a.safetensors")[IMG_W])
    assert digests(tmp_path, d).items() >= before.items()


def test_unwrap_picks_the_container_holding_the_model():
    """The rules behind the CLI cases above, in-process: a stray tensor beside a container does not hide
    it; tensors beside a smaller container stay the state dict and the container is named as not read."""
    from weightsmith.torchfile import unwrap_state_dict

    model = {f"layer{i}.weight": torch.ones(2) for i in range(4)}
    found = unwrap_state_dict({"state_dict": model, "global_step": torch.tensor(7)}, Path("x.ckpt"))
    assert found.tensors.keys() == model.keys() and found.where == ["state_dict"]
    found = unwrap_state_dict({**model, "ema": {"layer0.weight": torch.ones(2)}}, Path("x.ckpt"))
    assert found.tensors.keys() == model.keys() and found.note() == "not read: ['ema']"
    found = unwrap_state_dict({"checkpoint": {"state_dict": {"model": model}}}, Path("x.ckpt"))
    assert found.where == ["checkpoint", "state_dict", "model"] and found.tensors.keys() == model.keys()
    found = unwrap_state_dict({"model": model, "ema": model, "optimizer": {"state": {}}}, Path("x.ckpt"))
    assert found.where == ["model"] and found.alternatives == ["['ema']"]
