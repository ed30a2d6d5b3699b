"""`weightsmith replay FILE [-o OUT] [--input NAME=PATH]`: run again the command whose recipe FILE carries
(`weightsmith.recipe`, see provenance.py), on the same inputs — each checked against its recorded
fingerprint first — and say whether the tensors came out bit for bit the same."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import MismatchError, WeightsmithError
from ..outputs import output_set
from ..provenance import HASH_KEY, RECIPE_KEY, cli_recording, fingerprint_input, read_recipe, recording
from ..sources import open_model


class ChangedInputError(MismatchError):
    """An input of a recipe is not the file the recipe was made from."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "replay", help="re-run the recipe a weightsmith output carries, checking every input first",
        description="Re-run the command recorded in FILE's weightsmith.recipe on its inputs (found at their "
                    "recorded paths, or given with --input NAME=PATH). Every input is checked against its "
                    "recorded fingerprint before anything is computed: a changed input is refused, named, and "
                    "nothing is written. The result's tensor data hash is compared with FILE's.")
    p.add_argument("file", type=Path, help="a file weightsmith wrote (merge, mix, bake, extract, convert, compose, rerank)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="where to write the result (default: FILE's name with .replay before the suffix, beside it)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH",
                   help="use PATH for the recorded input NAME (its role such as base or models[1], or its file "
                        "name); repeatable")
    p.set_defaults(func=run_replay, records_itself=True)


def _parser_for(operation: str) -> argparse.ArgumentParser:
    from ..cli import build_parser

    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and operation in action.choices:
            return action.choices[operation]
    raise WeightsmithError(f"the recipe's command {operation!r} is not a command of this weightsmith version")


def _overrides(items: list[str], inputs: list[dict]) -> dict[str, str]:
    """role -> path from --input NAME=PATH, NAME a role or an input's file name."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise WeightsmithError(f"--input {item!r}: write NAME=PATH, e.g. --input base=/models/base.safetensors")
        hits = [i["role"] for i in inputs if name in (i.get("role"), i.get("name"), Path(i.get("name", "")).stem)]
        if len(hits) != 1:
            known = ", ".join(f"{i.get('role')} ({i.get('name')})" for i in inputs)
            why = "matches no input" if not hits else f"matches several inputs ({', '.join(hits)}): use the role"
            raise WeightsmithError(f"--input {name}: {why}; the recipe's inputs are {known}")
        out[hits[0]] = path
    return out


def _check_inputs(inputs: list[dict], overrides: dict[str, str]) -> dict[str, str]:
    """role -> the path to read, each checked against its recorded fingerprint (ChangedInputError)."""
    paths = {}
    for inp in inputs:
        role, name = inp.get("role", "?"), inp.get("name", "?")
        path = overrides.get(role) or inp.get("path") or ""
        if not path or not Path(path).exists():
            raise WeightsmithError(f"input {role} ({name}) is not at its recorded path {path or '(none)'}; give it "
                                   f"with --input {role}=PATH. Nothing was written")
        got = fingerprint_input(path)
        if got["fingerprint"] != inp.get("fingerprint") or got["size"] != inp.get("size"):
            raise ChangedInputError(
                f"input {role} ({name}): {path} is not the file this recipe was made from (size {got['size']} vs "
                f"{inp.get('size')} recorded, fingerprint {got['fingerprint']} vs {inp.get('fingerprint')}); "
                "replaying would not reproduce the output. Give the original file with "
                f"--input {role}=PATH. Nothing was written")
        paths[role] = path
    return paths


def _convert(action: argparse.Action | None, value):
    """A recorded JSON value as the option's parsed type (paths back to Path, …)."""
    kind = getattr(action, "type", None)
    if kind is None or value is None or not callable(kind):
        return value
    if isinstance(value, list):
        return [kind(v) if isinstance(v, str) else v for v in value]
    return kind(value) if isinstance(value, str) else value


def _substitute(value, given: str, new: str):
    """The recorded option value with the input's text `given` (or `given:STRENGTH`) pointing at `new`."""
    text = os.fspath(value)
    replaced = new + text[len(given):] if text.startswith(given) else new
    return type(value)(replaced) if isinstance(value, Path) else replaced


def namespace(recipe: dict, paths: dict[str, str], output: Path) -> argparse.Namespace:
    """The argparse namespace the recorded command runs with: this version's defaults, the recorded
    parameters (refused when this version does not know one), the inputs at `paths`, the new output."""
    operation = recipe.get("operation", "")
    sub = _parser_for(operation)
    actions = {a.dest: a for a in sub._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}
    ns = argparse.Namespace(**{d: a.default for d, a in actions.items()}, **sub._defaults)
    ns.command = operation
    params = dict(recipe.get("params") or {})
    ns.nonfinite = params.pop("nonfinite", "report")  # the global --nonfinite of the recorded run
    unknown = sorted(k for k in params if k not in actions)
    if unknown:
        raise WeightsmithError(f"the recipe sets {', '.join(unknown)}, which `weightsmith {operation}` of this version "
                               "does not have: it was made by another version; replaying could not reproduce it")
    for dest, value in params.items():
        setattr(ns, dest, _convert(actions[dest], value))
    for inp in recipe.get("inputs") or []:
        role, given = inp["role"], inp.get("given") or inp.get("path", "")
        dest, _, index = role.partition("[")
        if not hasattr(ns, dest):
            raise WeightsmithError(f"the recipe's input {role} is no option of `weightsmith {operation}`")
        if index:
            items = list(getattr(ns, dest))
            i = int(index.rstrip("]"))
            items[i] = _substitute(items[i], given, paths[role])
            setattr(ns, dest, items)
        else:
            setattr(ns, dest, _substitute(getattr(ns, dest), given, paths[role]))
    for dest in ("report", "chart", "json"):  # side outputs of the original run are not written again
        if dest in actions:
            setattr(ns, dest, None)
    for dest in ("dry_run", "plan_only", "overwrite"):
        if dest in actions:
            setattr(ns, dest, False)
    ns.output = _convert(actions.get("output"), os.fspath(output))
    return ns


def _default_output(file: Path) -> Path:
    return file.with_name(f"{file.stem}.replay{file.suffix}")


def run_replay(args: argparse.Namespace) -> int:
    from ..sources import set_default_nonfinite

    src = open_model(args.file)
    meta = dict(src.metadata)
    src.close()
    recipe = read_recipe(meta)
    if recipe is None:
        raise WeightsmithError(f"{args.file}: carries no {RECIPE_KEY} (not written by weightsmith, or by a version "
                               "before recipes); nothing to replay")
    if recipe.get("via") != "cli":
        raise WeightsmithError(
            f"{args.file}: made by {recipe.get('via')} {recipe.get('operation')!r}; replay re-runs command-line "
            "recipes only. `weightsmith inspect` lists every parameter and input of this one")
    inputs = recipe.get("inputs") or []
    overrides = _overrides(args.input, inputs)
    output = args.output or _default_output(args.file)
    if output.exists():
        raise WeightsmithError(f"{output} exists; choose another name with -o or remove it")
    paths = _check_inputs(inputs, overrides)  # before anything is read or written
    ns = namespace(recipe, paths, output)
    set_default_nonfinite(ns.nonfinite)
    print(f"replaying `weightsmith {recipe['operation']}` ({len(inputs)} inputs, fingerprints match) -> {output}")
    with recording(cli_recording(ns)), output_set(join=False):
        rc = int(ns.func(ns) or 0)
    if rc != 0:
        return rc
    return _compare(args.file, meta, output)


def _compare(file: Path, meta: dict[str, str], output: Path) -> int:
    """Whether the replayed tensors equal FILE's: their tensor data hashes (modelspec.hash_sha256, over
    every tensor byte in file order); 1 when they differ."""
    want = meta.get(HASH_KEY)
    src = open_model(output)
    got = src.metadata.get(HASH_KEY)
    src.close()
    if not want or not got:
        print(f"wrote {output}; {file if not want else output} records no {HASH_KEY}: compare the tensors yourself")
        return 0
    if want == got:
        print(f"wrote {output}: the same tensors as {file}, bit for bit (tensor data sha256 {got})")
        return 0
    print(f"wrote {output}, but its tensors differ from {file}'s (tensor data sha256 {got} vs {want}): the "
          "computation did not reproduce (another device, or another weightsmith or torch version?)")
    return 1
