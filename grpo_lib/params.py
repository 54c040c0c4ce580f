"""Typed parameters: one dataclass per notebook / script, loaded from YAML and validated.

A notebook's ``parameters`` cell holds the same fields as literals (one per line, with a comment);
papermill injects a YAML file's values after it. Scripts (``python -m grpo_lib.train x.yaml``,
``accelerate launch``) load the same YAML through :func:`load_params`, so both paths share one
schema and one set of checks. An unknown or mistyped key is an error naming it and listing the
valid ones.

A YAML file may start from another: ``base: 02_counting_grpo__strict_first_50.yaml`` (a path relative to the
file's own directory) loads that file first and lets this one's keys override it, so an ablation holds
only its one-line difference. Bases chain; a file that reaches itself again is an error naming the chain.

Schemas live next to the code they configure (``grpo_lib.train.GRPOParams``, ...); ``SCHEMAS``
maps a notebook / script name to its schema so that a params file ``params/<name>__<exp>.yaml``
can be validated knowing only its file name.

Sampling / training knobs (``num_steps``, ``noise_level``, ``shift``, ``lr``, ...) are range-checked by one
shared rule each (``KNOB_RULES``, applied by ``check_knobs(self)`` in every schema), so a knob has the same
rule and message everywhere; the math that consumes it (``grpo_lib.sde``, ``grpo_lib.grpo``) checks it once
more. A range error raised while ``load_params`` builds a schema ends with ``(from <file | --set>)``.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

# notebook or script name -> "module:Class" (imported lazily: schemas import torch & friends)
SCHEMAS: dict[str, str] = {
    "00_derivation_checks": "grpo_lib.derivation:DerivationParams",
    "01_cold_start": "grpo_lib.cold_start:ColdStartParams",
    "02_counting_grpo": "grpo_lib.train:GRPOParams",
    "03_evaluate": "grpo_lib.evaluate:EvalParams",
    "04_inference_preview": "grpo_lib.widgets:PreviewParams",
    "05_sample_efficiency": "grpo_lib.study:StudyParams",
    "pretrain": "grpo_lib.pretrain:PretrainParams",
}


# ---------------------------------------------------------------------------------------------
# Shared knob rules: each sampling / training knob has ONE rule and ONE message, applied by every
# params dataclass that has the field (``check_knobs(self)`` in its __post_init__). The math that
# consumes a knob (sde.py's step, grpo.py's loss, ...) checks it once more; nothing in between does.
# ---------------------------------------------------------------------------------------------
# name -> (kind, low, low_open, high, high_open); kind "int" needs an int (not bool), "float" a finite number
KNOB_RULES: dict[str, tuple[str, float | None, bool, float | None, bool]] = {
    "num_steps": ("int", 1, False, None, False),
    "eval_num_steps": ("int", 1, False, None, False),
    "group_size": ("int", 2, False, None, False),        # a group of one image has no spread (std = 0)
    "batch_size": ("int", 1, False, None, False),
    "lora_rank": ("int", 1, False, None, False),
    "noise_level": ("float", 0, False, None, False),     # 0 = ODE; GRPOParams tightens to > 0 (see train.py)
    "shift": ("float", 0, True, None, False),
    "guidance_scale": ("float", 0, False, None, False),  # 1 = no CFG
    "train_guidance_scale": ("float", 0, False, None, False),
    "clip_range": ("float", 0, True, None, False),
    "adv_clip_max": ("float", 0, True, None, False),
    "beta": ("float", 0, False, None, False),
    "lr": ("float", 0, True, None, False),
    "lora_alpha": ("float", 0, True, None, False),
    "ema_decay": ("float", 0, False, 1, True),           # 0 = off; 1 would never move
}


def _rule(name: str, override: dict) -> tuple:
    """``KNOB_RULES[name]`` with ``override``'s fields (kind / low / low_open / high / high_open) replaced."""
    fields = ("kind", "low", "low_open", "high", "high_open")
    return tuple({**dict(zip(fields, KNOB_RULES[name])), **override}.values())


def knob_expectation(name: str, **override) -> str:
    """The text 'a finite float > 0' etc. for knob ``name`` (``override`` replaces rule fields)."""
    kind, lo, lo_open, hi, hi_open = _rule(name, override)
    what = "an int" if kind == "int" else "a finite float"
    if lo is not None and hi is not None:
        return f"{what} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{what} {'>' if lo_open else '>='} {lo}"
    return what


def check_knob(name: str, value: Any, *, why: str = "", **override) -> None:
    """Raise ``ValueError('<name>=<value> must be <expected>')`` unless ``value`` obeys ``KNOB_RULES[name]``.

    ``override`` (kind / low / low_open / high / high_open) states a params-level difference of purpose
    through the same rule, e.g. GRPO's ``noise_level`` needs ``low_open=True`` (stochastic steps).
    """
    import math
    import numbers
    kind, lo, lo_open, hi, hi_open = _rule(name, override)
    ok = not isinstance(value, bool) and (
        isinstance(value, numbers.Integral) if kind == "int"
        else isinstance(value, numbers.Real) and math.isfinite(value))
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        # the message starts with "<name>=" so load_params can say where the value came from
        raise ValueError(f"{name}={value!r} must be {knob_expectation(name, **override)}{why}")


def check_knobs(obj: Any, **overrides: dict[str, Any]) -> None:
    """Apply ``check_knob`` to every field of ``obj`` named in ``KNOB_RULES`` (``overrides[name]`` per knob)."""
    for f in dataclasses.fields(obj):
        if f.name in KNOB_RULES:
            check_knob(f.name, getattr(obj, f.name), **overrides.get(f.name, {}))


def schema_for(name: str) -> type:
    """The params dataclass for a notebook / script name, or for a params file stem ``<name>__<exp>``."""
    key = name.split("__")[0]
    if key not in SCHEMAS:
        raise ValueError(f"no params schema for {name!r}; known names: {sorted(SCHEMAS)}")
    module, cls = SCHEMAS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def _type_ok(value: Any, tp: Any) -> bool:
    """Loose runtime check of a YAML value against a dataclass field annotation."""
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value) if inner is not Ellipsis else True
    if origin is dict:
        if not isinstance(value, Mapping):
            return False
        kt, vt = (typing.get_args(tp) or (Any, Any))
        return all(_type_ok(k, kt) and _type_ok(v, vt) for k, v in value.items())
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _coerce(value: Any, tp: Any) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is tuple and isinstance(value, list):
        return tuple(value)
    return value


class _Yaml12FloatLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` as a float (YAML 1.2; PyYAML's YAML 1.1 wants ``1.0e-4`` and
    would hand the string ``'1e-4'`` to the type check)."""


_Yaml12FloatLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12FloatLoader)


BASE_KEY = "base"


def read_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping of a params YAML file with its ``base:`` chain resolved (base first, this file's keys on top).

    ``base`` is relative to the file's own directory. A cycle (``a.yaml -> b.yaml -> a.yaml``) or a base that
    does not exist is a ``ValueError`` naming the chain.
    """
    path = Path(path)
    chain = _chain + (path.resolve(),)
    shown = " -> ".join(str(c.name) for c in chain)
    if not path.is_file():
        raise ValueError(f"params file {str(path)!r} does not exist" + (f" (base chain {shown})" if _chain else ""))
    loaded = _load_yaml(path.read_text()) or {}
    if not isinstance(loaded, Mapping):
        raise ValueError(f"params file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
    loaded = dict(loaded)
    base = loaded.pop(BASE_KEY, None)
    if base is None:
        return loaded
    if not isinstance(base, str) or not base:
        raise ValueError(f"{BASE_KEY}={base!r} in {str(path)!r} must name another params YAML file")
    base_path = (path.parent / base)
    if base_path.resolve() in chain:
        raise ValueError(f"params base chain is a cycle: {shown} -> {base_path.name}")
    return {**read_yaml(base_path, chain), **loaded}


def load_params(source: str | Path | Mapping[str, Any] | None, schema: type | None = None, *,
                overrides_origin: str = "overrides", **overrides: Any):
    """Build a params dataclass from a YAML file, a mapping, or nothing (defaults), plus overrides.

    ``schema`` defaults to the one named by the YAML file's stem (``params/02_counting_grpo__x.yaml``).
    Raises ``ValueError`` naming any unknown key (with the valid ones) or any value of the wrong type, and
    where it came from: the YAML file (or its base), the mapping, or ``overrides_origin`` for the overrides
    (scripts pass ``"--set"``). The dataclass's own ``__post_init__`` does the range checks.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if isinstance(source, (str, Path)):
        path = Path(source)
        values.update(read_yaml(path))
        origin = dict.fromkeys(values, str(path))
        if schema is None:
            schema = schema_for(path.stem)
    elif source is not None:
        values.update(source)
        origin = dict.fromkeys(values, "mapping")
    values.update(overrides)
    origin.update(dict.fromkeys(overrides, overrides_origin))
    if schema is None:
        raise ValueError("load_params needs a schema when the source is not a params/<name>__<exp>.yaml file")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = sorted({origin[k] for k in unknown})
        raise ValueError(f"unknown parameter(s) {unknown} in {', '.join(where)} for {schema.__name__}; "
                         f"valid keys are: {sorted(fields)}")
    for k, v in list(values.items()):
        if not _type_ok(v, hints[k]):
            raise ValueError(f"parameter {k}={v!r} in {origin[k]} has type {type(v).__name__}, "
                             f"expected {hints[k]}")
        values[k] = _coerce(v, hints[k])
    try:
        return schema(**values)
    except ValueError as e:   # a range check naming one key ("<key>=..."): add where that key came from
        key = str(e).split("=", 1)[0]
        if key in origin:
            raise ValueError(f"{e} (from {origin[key]})") from e
        raise


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["num_epochs=2", "run_dir=runs/x"]`` (a script's ``--set``) -> ``{"num_epochs": 2, "run_dir": "runs/x"}``;
    values are parsed as YAML, so numbers, booleans and mappings keep their types."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = _load_yaml(v)
    return out


def load_params_with_set(path: str | Path, schema: type | None, set_items: list[str]):
    """A script's params: the YAML file (with its ``base:`` chain) and ``--set KEY=VALUE`` overrides, whose
    errors name ``--set``."""
    return load_params(path, schema, overrides_origin="--set", **parse_overrides(set_items))


def to_dict(params) -> dict[str, Any]:
    """Plain dict of a params dataclass (for logging, JSON and papermill)."""
    return json.loads(json.dumps(dataclasses.asdict(params), default=list))


def notebook_parameters(notebook_path: str | Path) -> dict[str, Any]:
    """The literals of a notebook's ``parameters``-tagged cell, as a dict.

    Raises ``ValueError`` if the cell is missing or holds anything but ``name = <literal>`` lines,
    because papermill and :func:`load_params` both rely on it being pure data.
    """
    nb = json.loads(Path(notebook_path).read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{notebook_path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    src = "".join(cells[0]["source"])
    out: dict[str, Any] = {}
    for node in ast.parse(src).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"{notebook_path}: parameters cell line {node.lineno} is not `name = literal`")
        try:
            out[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError as e:
            raise ValueError(f"{notebook_path}: parameter {node.targets[0].id!r} is not a literal") from e
    return out


def params_in_notebook(namespace: Mapping[str, Any], schema: type):
    """A notebook's params: the values of ``schema``'s fields in the notebook's ``namespace`` (its parameters
    cell, as papermill overrode it), checked by :func:`load_params`.

    ``papermill -f params/x.yaml`` injects every key of the file as it is, so a file that extends another
    (``base: other.yaml``) arrives as a variable ``base`` and the base's values never arrive: the notebook would
    silently run on its own defaults for them. That raises ``ValueError`` here, naming a resolved file to pass
    instead (``python -m grpo_lib.params x.yaml`` writes one; ``python -m grpo_lib.pipeline`` resolves it itself).
    """
    if "base" in namespace:
        raise ValueError(f"papermill passed base={namespace['base']!r}: papermill does not follow a params file's "
                         "base: chain, so the base's values would be lost. Pass the resolved file instead: "
                         "python -m grpo_lib.params params/<file>.yaml > resolved.yaml; papermill ... -f resolved.yaml")
    return load_params({f.name: namespace[f.name] for f in dataclasses.fields(schema)}, schema)


def main(argv: list[str] | None = None) -> int:
    """``python -m grpo_lib.params FILE.yaml``: print the file with its ``base:`` chain resolved and every field
    filled in (defaults included), as YAML, for tools that do not follow ``base:`` (papermill ``-f``)."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    ap.add_argument("params", help="params/<notebook>__<experiment>.yaml")
    args = ap.parse_args(argv)
    sys.stdout.write(yaml.safe_dump(to_dict(load_params(args.params)), sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
