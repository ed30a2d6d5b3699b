"""Honest recipes, reports and charts (issue #21 items 7, 8, 9): the shipped weighted-sum-reference recipe
gives a real split and every run names a tie-decided mix; charts keep the smallest bar and whole labels,
with the reports' own group names; extract and validate agree on "optimal" and say what "(bound)" means;
the merge plan says what became of keys not every input has; inputs and architectures are named as users
know them."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from weightsmith.cli import main
from weightsmith.lora.extract import extract_lora
from weightsmith.lora.formats import load_lora, lora_state_dict, save_lora
from weightsmith.lora.testloras import random_lora
from weightsmith.lora.validate import validate_lora
from weightsmith.merge.plan import plan_merge
from weightsmith.mix import lossless_mix
from weightsmith.report import an_arch, bar_chart, value_axis
from weightsmith.sdunet import sd_unet_shapes, write_sd15_tiny
from weightsmith.testmodels import FluxConfig, finetune, flux_state_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "workflows" / "api" / "lossless_mix_reference_recipe.json"


def _recipe_mix_inputs() -> dict:
    api = json.loads(RECIPE.read_text())
    return next(n["inputs"] for n in api.values() if n["class_type"] == "WeightsmithLosslessMix")


@pytest.fixture(scope="module")
def sd15_pair(tmp_path_factory) -> dict[str, Path]:
    """The demo's two SD1.5 models (fp16, as `make demo` writes them) and their 0.5/0.5 weighted sum."""
    d = tmp_path_factory.mktemp("recipe")
    a, b, ab = d / "a.safetensors", d / "b.safetensors", d / "ab.safetensors"
    write_sd15_tiny(a, seed=10)
    write_sd15_tiny(b, seed=11)
    assert main(["merge", str(a), str(b), "-o", str(ab), "--weights", "0.5,0.5"]) == 0
    return {"a": a, "b": b, "ab": ab}


# --- item 7: the recipe and the tie warning ------------------------------------------------------------


def test_shipped_recipe_gives_a_real_split(sd15_pair, tmp_path, capsys):
    mix = _recipe_mix_inputs()
    assert mix["alpha"] != mix["beta"]  # unscaled, a weighted-sum reference ties everywhere
    capsys.readouterr()
    out = tmp_path / "recipe.safetensors"
    assert main(["mix", str(sd15_pair["ab"]), str(sd15_pair["a"]), str(sd15_pair["b"]), "-o", str(out),
                 "--alpha", str(mix["alpha"]), "--beta", str(mix["beta"]), "--report", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "WARNING" not in captured.out + captured.err
    unet = next(g for g in json.loads((tmp_path / "r.json").read_text())["groups"] if g["group"] == "unet")
    assert 0.1 < unet["from b"] < 0.9 and abs(unet["from b"] + unet["from c"] - 1) < 1e-9
    # decided by the values, not by ties: a dry run's statistics count almost none
    dry = lossless_mix(sd15_pair["ab"], sd15_pair["a"], sd15_pair["b"], alpha=mix["alpha"], beta=mix["beta"],
                       dry_run=True)
    assert dry.rows[0]["ties"] < 1e-3 and not dry.to_json()["tie_warning"]


def test_mix_help_recommends_the_biased_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["mix", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--alpha 1 --beta 0.9" in text and "every element ties" in text


def test_tie_warning_in_a_normal_run(sd15_pair, tmp_path, capsys):
    """alpha = beta on a weighted-sum reference: a real run (no statistics of its own) names it in the report."""
    out = tmp_path / "tied.safetensors"
    assert main(["mix", str(sd15_pair["ab"]), str(sd15_pair["a"]), str(sd15_pair["b"]), "-o", str(out),
                 "--report", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "WARNING: a is almost exactly a blend of b and c" in captured.out and "Checked on a sample" in captured.out
    assert captured.err == ""  # stderr stays for errors
    assert "blend of b and c" in json.loads((tmp_path / "r.json").read_text())["tie_warning"]
    assert out.is_file()


@pytest.mark.comfy
def test_nodes_report_ties_and_name_their_inputs(comfy, sd15_pair, tmp_path, monkeypatch):
    import folder_paths
    from comfy_extras.nodes_model_merging import ModelMergeSimple
    from comfy_support import import_pack, unet_patcher
    from safetensors.torch import load_file

    nodes = import_pack().NODE_CLASS_MAPPINGS
    mix = _recipe_mix_inputs()
    pa, pb = (unet_patcher({k: v.float() for k, v in load_file(sd15_pair[t]).items()}, "sd15") for t in "ab")
    (ab,) = ModelMergeSimple().merge(pa, pb, 0.5)
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "weightsmith_demo/a.safetensors"}},
              "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "weightsmith_demo/b.safetensors"}},
              "3": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["2", 0], "ratio": 0.5},
                    "_meta": {"title": "Reference ab"}},
              "4": {"class_type": "WeightsmithLosslessMix",
                    "inputs": {"model_a": ["3", 0], "model_b": ["1", 0], "model_c": ["2", 0]}}}
    node = nodes["WeightsmithLosslessMix"]()
    # the shipped recipe in-graph (fp32, as ComfyUI loads it on the CPU): a real split, no warning
    text = node.mix(ab, pa, pb, mix["alpha"], mix["beta"], mix["mode"], True, unique_id="4", prompt=prompt)["result"][1]
    shares = re.search(r"^unet\s+\d+\s+\d+\s+\S+\s+\S+\s+(\S+)\s+(\S+)", text, re.M)
    assert shares and 0.1 < float(shares.group(1)) < 0.9, text
    assert "WARNING" not in text
    assert "a = model_a: Reference ab (#3)" in text and "b = model_b: a.safetensors (#1)" in text
    assert "a = a" not in text
    # unbiased, without the statistics pass (report off): the sampled check still warns
    text = node.mix(ab, pa, pb, 1.0, 1.0, "min_diff (nearest)", False)["result"][1]
    assert "WARNING: a is almost exactly a blend of b and c" in text and "a = model_a" in text

    # the files node: a real (not dry) run warns too
    dm = tmp_path / "diffusion_models"
    dm.mkdir()
    for t in ("a", "b", "ab"):
        (dm / f"{t}.safetensors").write_bytes(sd15_pair[t].read_bytes())
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", ([str(dm)], {".safetensors"}))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    monkeypatch.setattr(folder_paths, "output_directory", str(tmp_path / "out"))
    files = nodes["WeightsmithLosslessMixFiles"]
    choices = files.INPUT_TYPES()["required"]["model_a"][0]
    pick = {t: next(c for c in choices if c.endswith(f"/{t}.safetensors") or c == f"{t}.safetensors")
            for t in ("a", "b", "ab")}
    res = files().mix(pick["ab"], pick["a"], pick["b"], 1.0, 1.0, "min_diff (nearest)", True, False, False, False,
                      "output", "tied/x")
    assert "WARNING: a is almost exactly a blend of b and c" in res["result"][1]


# --- item 8: charts ------------------------------------------------------------------------------------


def test_log_axis_starts_below_the_smallest_value():
    for smallest in (1e-4, 0.01, 0.05, 0.3, 1.0):
        axis = value_axis([smallest, 0.5, 2.0], log=True)
        assert axis.lo <= math.log10(smallest) - 1 / 3 and axis.lo == int(axis.lo)  # a whole decade, well below
        assert axis.position(smallest) >= 1 / 3 / (axis.hi - axis.lo) > 0
        assert axis.hi >= math.log10(2.0) and all(float(label) == 10 ** pos for pos, label in axis.ticks)
    lin = value_axis([0.6863, 0.51], log=False)
    assert lin.lo == 0 and lin.hi >= 0.6863 and [t for _, t in lin.ticks] == ["0", "0.2", "0.4", "0.6", "0.8"]


def _bar_height(img: np.ndarray, color: tuple[int, int, int], x_range: tuple[int, int]) -> int:
    mask = (img[:, x_range[0]:x_range[1]] == np.array(color, dtype=np.uint8)).all(axis=2)
    return int(mask.any(axis=1).sum())


def test_rendered_chart_keeps_the_smallest_bar_and_whole_labels():
    labels = ["guidance_in", "double_blocks.12", "input_blocks.11", "img_in"]
    img = bar_chart(labels, {"x": [1e-4, 0.5, 0.2, 3.0]}, title="t", ylabel="v", log=True)
    h, w, _ = img.shape
    blue = (66, 133, 244)
    # 4 groups over the plot width: the first bar lies in the first quarter
    first = _bar_height(img, blue, (70, 70 + (w - 90) // 4))
    assert first >= 20, "the smallest bar vanished"
    # the labels are drawn whole: a gray text column under each group, ending above the legend, and the
    # tallest one (the longest label) is as tall as the whole text
    from PIL import Image, ImageDraw

    from weightsmith.report import _font

    text_w = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), "double_blocks.12", font=_font())[2]
    gray = (np.abs(img.astype(int) - 200).max(axis=2) < 60)
    legend_top = h - 24
    rows = np.nonzero(gray[:legend_top, (w - 90) // 4 + 70:(w - 90) // 2 + 70].any(axis=1))[0]
    label_rows = rows[rows > h // 2]
    assert label_rows.size and label_rows.max() - label_rows.min() + 1 >= text_w - 2
    assert label_rows.max() < legend_top


def test_chart_labels_are_the_reports_group_names(sd15_pair, monkeypatch):
    import weightsmith.merge.report as merge_report
    import weightsmith.mix_report as mix_report
    from weightsmith.merge.execute import execute_merge

    seen = {}

    def record(name):
        def chart(labels, series, **kw):
            seen[name] = list(labels)
            return np.zeros((2, 2, 3), np.uint8)
        return chart

    monkeypatch.setattr(mix_report, "bar_chart", record("mix"))
    monkeypatch.setattr(merge_report, "bar_chart", record("merge"))
    rep = lossless_mix(sd15_pair["ab"], sd15_pair["a"], sd15_pair["b"], dry_run=True)
    rep.chart()
    assert seen["mix"] == [r["group"] for r in rep.rows if r["group"] != "unet"]
    assert "input_blocks.0" in seen["mix"]
    merged = execute_merge(plan_merge([sd15_pair["a"], sd15_pair["b"]]), None)
    merged.chart()
    assert seen["merge"] == [g["group"] for g in merged.groups() if g.get("change") is not None]
    assert "input_blocks.0" in seen["merge"] and not any(lab.startswith(("in.", "input0")) for lab in seen["merge"])


# --- item 9: reports -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_pair(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("flux")
    base = flux_state_dict(FluxConfig(hidden=128), "dev", seed=0)
    tuned = finetune(base, seed=1, rank=24, scale=0.1, noise=0.01)
    paths = {"base": d / "base.safetensors", "tuned": d / "tuned.safetensors"}
    save_file(base, str(paths["base"]))
    save_file(tuned, str(paths["tuned"]))
    return paths


@pytest.mark.parametrize("options", [{"rank": 8}, {"rank_mode": "energy", "energy": 0.6, "max_rank": 32},
                                     {"rank": 8, "seed": 5}])
def test_extract_and_validate_report_one_optimal(flux_pair, tmp_path, options):
    lora, ext = extract_lora(flux_pair["base"], flux_pair["tuned"], **options)
    path = save_lora(lora, tmp_path / "l.safetensors")
    val = validate_lora(flux_pair["base"], flux_pair["tuned"], path)
    got = {m.key: m for m in ext.modules if m.status == "lowrank"}
    want = {m.key: m for m in val.modules if m.status == "lowrank"}
    assert got.keys() == want.keys() and got
    assert any(not m.optimal_exact for m in got.values())  # some layers use the randomized bound
    for k in got:
        assert got[k].optimal_error == pytest.approx(want[k].optimal_error, rel=1e-9, abs=1e-12), k
        assert got[k].optimal_exact == want[k].optimal_exact, k
    assert ext.summary()["optimal_global"] == pytest.approx(val.summary()["optimal_global"], rel=1e-9)
    for text in (ext.text(), val.text()):
        assert "optimal (bound)" in text and "'(bound)': for layers too large for the exact SVD" in text


def test_merge_plan_says_what_became_of_partial_keys():
    dev = flux_state_dict(FluxConfig(), "dev", seed=0)
    schnell = flux_state_dict(FluxConfig(), "schnell", seed=1)
    dropped = plan_merge([dev, schnell], presets=["flux-guidance-drop"]).describe()
    assert "4 keys not in every input" in dropped and "4 dropped by the rule '@guidance=drop'" in dropped
    assert "(take)" not in dropped
    taken = plan_merge([dev, schnell]).describe()
    assert "4 taken from A (missing-key policy take)" in taken


def test_architectures_named_as_users_know_them():
    assert [an_arch(a) for a in ("sd15", "sdxl", "flux", "chroma", "qwen-image", "wan")] == [
        "an SD1.5", "an SDXL", "a Flux", "a Chroma", "a Qwen-Image", "a Wan"]
    sd15 = random_lora(sd_unet_shapes("sd15", "tiny"), "sd15", rank=2)
    from weightsmith.errors import MismatchError

    with pytest.raises(MismatchError) as err:
        load_lora(lora_state_dict(sd15, "comfy"), arch="flux")
    assert "is an SD1.5 LoRA, not a Flux one" in str(err.value) and "a sd15" not in str(err.value)
