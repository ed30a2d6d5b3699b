"""CLI manners (issue #21 item 11): negative numbers as option values, a closed pipe, --version, output
names without their format's extension, an empty file in `inspect`, swapped arguments of validate/extract,
and a method or rule that needs an input that is not given — named the CLI's way and the nodes' way."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.cli import main
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import save_lora
from weightsmith.sdunet import write_sd15_tiny
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd15(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sd15")
    out = {}
    for i, tag in enumerate("abc"):
        out[tag] = d / f"sd15-{tag}.safetensors"
        write_sd15_tiny(out[tag], seed=10 + i)
    return out


@pytest.fixture(scope="module")
def flux(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("flux")
    base = flux_state_dict(FluxConfig(), "dev", seed=0)
    tuned = finetune(base, seed=1, rank=4, scale=0.1)
    paths = {"base": d / "base.safetensors", "tuned": d / "tuned.safetensors", "lora": d / "lora.safetensors"}
    save_file(base, str(paths["base"]))
    save_file(tuned, str(paths["tuned"]))
    lora, _ = extract_lora(paths["base"], paths["tuned"], rank=4)
    save_lora(lora, paths["lora"])
    return paths


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / ".shim"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "weightsmith", *args], capture_output=True, text=True, env=env,
                          timeout=120, **kw)


def test_negative_numbers_are_option_values(sd15, tmp_path, capsys):
    """`--weights -1,2` is a list of weights (an extrapolation), not an unknown option `-1,2`."""
    out = tmp_path / "x.safetensors"
    assert main(["merge", str(sd15["a"]), str(sd15["b"]), "-o", str(out), "--weights", "-1,2", "--dtype", "fp32"]) == 0
    a, b, got = load_file(sd15["a"]), load_file(sd15["b"]), load_file(out)
    k = next(k for k in got if k.endswith("input_blocks.0.0.weight"))
    assert torch.allclose(got[k], -a[k].float() + 2 * b[k].float(), atol=1e-5)
    # an exponent and a negative first element of a longer list too
    assert main(["mix", str(sd15["a"]), str(sd15["b"]), str(sd15["c"]), "--dry-run", "--alpha", "-1e-3"]) == 0
    assert "scales -0.001, 1" in capsys.readouterr().out


def test_closed_pipe_exits_quietly(sd15, tmp_path):
    """`weightsmith … | head`: the reader goes away before the output is written. No traceback, no 'error:',
    and the work the command was asked for is still done (the model file is written)."""
    out = tmp_path / "piped.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT / ".shim")}
    p = subprocess.Popen([sys.executable, "-m", "weightsmith", "merge", str(sd15["a"]), str(sd15["b"]), "-o", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # like `head` exiting: every write to stdout now meets a closed pipe
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "error" not in err.lower(), err
    assert out.is_file()


def test_version():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("weightsmith ") and r.stdout.split()[1][0].isdigit(), r


@pytest.mark.parametrize("option,suffix", [("--report", ".json"), ("--chart", ".png")])
def test_secondary_outputs_need_their_extension(sd15, tmp_path, capsys, option, suffix):
    out = tmp_path / "m.safetensors"
    noext = tmp_path / "noext"
    assert main(["merge", str(sd15["a"]), str(sd15["b"]), "-o", str(out), option, str(noext)]) == 2
    err = capsys.readouterr().err
    assert f"give it a {suffix} name" in err and "noext" in err
    assert not out.exists() and not noext.exists()  # refused before any work


def test_model_outputs_need_their_extension(tmp_path, capsys):
    for argv in (["testmodels", "flux-dev", "-o", str(tmp_path / "noext")],):
        assert main(argv) == 2
        assert "give the output a .safetensors or .sft name" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_inspect_says_a_file_without_tensors_is_empty(tmp_path, capsys):
    p = tmp_path / "empty.safetensors"
    save_file({}, str(p))
    assert main(["inspect", str(p), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "empty" in out and "holds no tensors" in out and "full model" not in out
    assert '"kind": "empty"' in (tmp_path / "s.json").read_text()


def test_validate_with_swapped_arguments_names_the_lora(flux, capsys):
    base, tuned, lora = flux["base"], flux["tuned"], flux["lora"]
    right = f"weightsmith validate {base} {tuned} {lora}"
    for argv in ([lora, base, tuned], [base, lora, tuned]):
        assert main(["validate", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert "wrong order" in err and f"{lora} is the LoRA" in err and right in err, err
        assert "Extract from a fine-tune" not in err
    assert main(["validate", str(base), str(tuned), str(tuned)]) == 2
    assert f"{tuned} is a full model, not a LoRA" in capsys.readouterr().err
    assert main(["extract", str(base), str(lora), "-o", str(lora.parent / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{lora} is a LoRA, given as the tuned model" in err and "weightsmith validate BASE TUNED LORA" in err
    assert main(["validate", str(base), str(tuned), str(lora)]) == 0  # the right order still works


def test_cli_names_the_missing_input(sd15, tmp_path, capsys):
    a, b, c = (str(sd15[t]) for t in "abc")
    out = str(tmp_path / "o.safetensors")
    assert main(["merge", a, b, "-o", out, "--method", "add_difference"]) == 2
    err = capsys.readouterr().err
    assert "add_difference" in err and "only 2 are given (model A, model B): give model C too" in err
    assert main(["merge", a, b, "-o", out, "--rule", "input_blocks=take:C"]) == 2
    err = capsys.readouterr().err
    assert "rule 'input_blocks=take:C' names model C" in err and "(model A, model B)" in err
    # a rule that matches no key is checked too (it would otherwise pass unnoticed)
    assert main(["merge", a, b, "-o", out, "--rule", "no_such_key=add_dissimilar(base=C)"]) == 2
    assert "names model C" in capsys.readouterr().err
    assert main(["merge", a, b, c, "-o", out, "--method", "slerp"]) == 2
    assert "leave out model C" in capsys.readouterr().err
    assert not Path(out).exists()


@pytest.mark.comfy
def test_nodes_name_the_socket_to_connect(comfy):
    from comfy_support import flux_patcher, import_pack

    pack = import_pack()
    nodes = pack.NODE_CLASS_MAPPINGS
    WeightsmithError = sys.modules[pack.__name__ + ".core.errors"].WeightsmithError  # the pack's own classes
    base = flux_state_dict(FluxConfig(), "dev", seed=0)
    a, b = flux_patcher(base), flux_patcher(finetune(base, seed=1, rank=4, scale=0.1))
    node = nodes["WeightsmithMergeModels"]()
    kw = dict(weights="", params="", preset="none", missing="take", report=False)
    with pytest.raises(WeightsmithError, match=r"only 2 are connected \(model_a, model_b\): connect a model to "
                                               r"model_c too"):
        node.merge(model_a=a, model_b=b, method="add_difference", rules="", **kw)
    with pytest.raises(WeightsmithError, match=r"rule '@double=take:C' names model_c, but only 2 inputs are "
                                               r"connected \(model_a, model_b\)"):
        node.merge(model_a=a, model_b=b, method="weighted_sum", rules="@double=take:C", **kw)
