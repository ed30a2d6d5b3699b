"""`weightsmith replay FILE`: re-runs the recipe FILE carries and reproduces its tensors bit for bit (merge, mix,
extract, compose, and bake, convert, rerank too); refuses a changed input before anything is written, naming
it (exit 2); finds moved inputs with --input NAME=PATH."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from weightsmith.cli import main
from weightsmith.provenance import RECIPE_KEY
from weightsmith.testmodels import FluxConfig, flux_shapes, write_model

CFG = FluxConfig()


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("replay")
    shapes = flux_shapes(CFG, "dev")
    for i, name in enumerate("abc"):
        write_model(d / f"{name}.safetensors", shapes, seed=i)
    p = {n: str(d / f"{n}.safetensors") for n in "abc"}
    runs = [
        ["merge", p["a"], p["b"], p["c"], "-o", str(d / "merge.safetensors"), "--method", "dare", "--param", "seed=3",
         "--param", "drop_rate=0.3", "--rule", "@single=take:B", "--dtype", "bf16"],
        ["mix", p["a"], p["b"], p["c"], "-o", str(d / "mix.safetensors"), "--alpha", "0.8", "--maxdiff"],
        ["extract", p["a"], p["b"], "-o", str(d / "extract.safetensors"), "--rank", "3", "--seed", "9"],
        ["extract", p["a"], p["c"], "-o", str(d / "extract2.safetensors"), "--rank", "2", "--rank-mode", "energy",
         "--energy", "0.5", "--format", "diffusers", "--no-diff"],
        ["compose", str(d / "extract.safetensors") + ":0.7", str(d / "extract2.safetensors") + ":-0.4", "-o",
         str(d / "compose.safetensors"), "--rank", "2"],
        ["bake", p["a"], str(d / "extract.safetensors") + ":0.5", "-o", str(d / "bake.safetensors")],
        ["convert", str(d / "extract2.safetensors"), "-o", str(d / "convert.safetensors"), "--to", "kohya"],
        ["rerank", str(d / "compose.safetensors"), "-o", str(d / "rerank.safetensors"), "--rank", "1"],
    ]
    for argv in runs:
        assert main(argv) == 0, argv
    return d


def assert_same_tensors(x, y):
    a, b = load_file(str(x)), load_file(str(y))
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["merge", "mix", "extract", "compose", "bake", "convert", "rerank"])
def test_replay_reproduces_bit_for_bit(d, kind, capsys):
    original = d / f"{kind}.safetensors"
    out = d / f"{kind}_again.safetensors"
    capsys.readouterr()
    assert main(["replay", str(original), "-o", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"replaying `weightsmith {kind}`" in shown and "bit for bit" in shown
    assert_same_tensors(original, out)
    with safe_open(str(out), "pt") as f:
        again = json.loads(f.metadata()[RECIPE_KEY])
    with safe_open(str(original), "pt") as f:
        first = json.loads(f.metadata()[RECIPE_KEY])
    # the replayed file's recipe is the original's, with the new output: it can be replayed again
    assert again["inputs"] == first["inputs"]
    assert {k: v for k, v in again["params"].items() if k != "output"} == \
        {k: v for k, v in first["params"].items() if k != "output"}


def test_replay_default_output_name(d):
    out = d / "merge.replay.safetensors"
    assert main(["replay", str(d / "merge.safetensors")]) == 0
    assert_same_tensors(d / "merge.safetensors", out)
    assert main(["replay", str(d / "merge.safetensors")]) == 2  # never over an existing file


def test_replay_refuses_a_changed_input_and_finds_a_moved_one(d, tmp_path, capsys):
    moved = tmp_path / "inputs"
    moved.mkdir()
    for n in "abc":
        shutil.copy(d / f"{n}.safetensors", moved / f"{n}.safetensors")
    made = tmp_path / "mix.safetensors"
    assert main(["mix", str(moved / "a.safetensors"), str(moved / "b.safetensors"), str(moved / "c.safetensors"),
                 "-o", str(made)]) == 0
    # C changed (another model saved under its name): refused, named, nothing written
    sd = load_file(str(moved / "c.safetensors"))
    sd["img_in.weight"] = sd["img_in.weight"] + 1
    save_file(sd, str(moved / "c.safetensors"))
    out = tmp_path / "again.safetensors"
    capsys.readouterr()
    assert main(["replay", str(made), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "input candidates[1] (c.safetensors)" in err and "not the file this recipe was made from" in err
    assert "Nothing was written" in err and not out.exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left either
    # the original is elsewhere: --input by role or by file name
    assert main(["replay", str(made), "-o", str(out), "--input", f"candidates[1]={d / 'c.safetensors'}"]) == 0
    assert_same_tensors(made, out)
    out.unlink()
    assert main(["replay", str(made), "-o", str(out), "--input", f"c.safetensors={d / 'c.safetensors'}"]) == 0
    # an input that is gone, and a name that matches no input
    (moved / "b.safetensors").unlink()
    out.unlink()
    capsys.readouterr()
    assert main(["replay", str(made), "-o", str(out), "--input", f"c={d / 'c.safetensors'}"]) == 2
    assert "input candidates[0] (b.safetensors) is not at its recorded path" in capsys.readouterr().err
    assert main(["replay", str(made), "-o", str(out), "--input", "zzz=/nowhere"]) == 2
    assert "matches no input" in capsys.readouterr().err and not out.exists()


def test_replay_refuses_a_file_without_a_recipe(d, capsys):
    assert main(["replay", str(d / "a.safetensors"), "-o", str(d / "x.safetensors")]) == 2
    assert "carries no weightsmith.recipe" in capsys.readouterr().err


def test_replay_refuses_what_the_tensors_cannot_reproduce(d, tmp_path, capsys):
    """A recipe from a version with an option this one lacks is refused, not half-replayed; the result is
    compared with the file (exit 1 when the tensors differ)."""
    with safe_open(str(d / "merge.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    recipe = json.loads(meta[RECIPE_KEY])
    recipe["params"]["future_option"] = 1
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata={**meta, RECIPE_KEY: json.dumps(recipe)})
    capsys.readouterr()
    assert main(["replay", str(forged), "-o", str(tmp_path / "o.safetensors")]) == 2
    assert "future_option" in capsys.readouterr().err
    # the same recipe over tensors that are not what it makes: the replay says so
    recipe["params"].pop("future_option")
    tensors = {k: (v + 1 if k == "img_in.weight" else v) for k, v in tensors.items()}
    changed = tmp_path / "changed.safetensors"
    save_file(tensors, str(changed), metadata={**meta, RECIPE_KEY: json.dumps(recipe),
                                               "modelspec.hash_sha256": "0x" + "1" * 64})
    assert main(["replay", str(changed), "-o", str(tmp_path / "o.safetensors")]) == 1
    assert "differ" in capsys.readouterr().out
