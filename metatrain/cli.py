"""Argument parsing for recipes: dataclasses from a YAML config, overridden by `--key value` flags."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from transformers import HfArgumentParser

from .training_args import REMOVED_META_OPTIMIZER_FIELDS, meta_optimizer_kwargs_for

# options recipes no longer take, and what replaced them: named in the error instead of argparse's "unrecognized"
REMOVED_OPTIONS = {
    "evograd_kwargs": "give each method's estimator options in the recipe's `method_options`, e.g. "
    "`method_options: {mwn_evograd: {population: 2, sigma: 0.001}}` in the YAML config or `--method_options "
    '\'{"mwn_evograd": {"population": 2, "sigma": 0.001}}\'` (a flag replaces the config\'s whole mapping); to change '
    "one option of every run of the estimator `--hypergradient` names (EvoGrad by default), pass "
    "`--hypergradient_kwargs '{\"sigma\": 0.01}'`, which updates each method's `method_options`",
    **{
        name: f"give `{option}` in `meta_optimizer_kwargs`, e.g. `meta_optimizer_kwargs: {{{option}: ...}}` in the "
        f"YAML config or `--meta_optimizer_kwargs '{{\"{option}\": ...}}'`"
        for name, option in REMOVED_META_OPTIMIZER_FIELDS.items()
    },
}


def _flag_values(argv: list[str]) -> dict[str, Any]:
    """`{name: value}` of the `--name value`, `--name=value` and bare `--name` (True) flags in `argv`."""
    values: dict[str, Any] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
            values[name.replace("-", "_")] = value
    return values


def _removed_message(removed: list[str], given: dict[str, Any]) -> str:
    """The error for `removed` options; the meta-optimizer's, given together, are replaced by one
    `meta_optimizer_kwargs` built from their values (a flag's over the YAML config's)."""
    messages = [
        f"`{key}` was removed: {REMOVED_OPTIONS[key]}." for key in removed if key not in REMOVED_META_OPTIMIZER_FIELDS
    ]
    meta = [key for key in removed if key in REMOVED_META_OPTIMIZER_FIELDS]
    if meta:
        kwargs = json.dumps(meta_optimizer_kwargs_for({key: given[key] for key in meta}))
        messages.append(
            f"{' and '.join(f'`{key}`' for key in meta)} {'was' if len(meta) == 1 else 'were'} removed: give the "
            f"meta-optimizer's options in `meta_optimizer_kwargs`, here `meta_optimizer_kwargs: {kwargs}` in the YAML "
            f"config or `--meta_optimizer_kwargs '{kwargs}'`."
        )
    return " ".join(messages)


def _to_argv(config: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in config.items():
        if isinstance(value, list):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_config(dataclass_types: Sequence[type], argv: list[str] | None = None, default_config: str | None = None):
    """Parses `dataclass_types` from an optional YAML file followed by command-line overrides.

    `argv` is `[config.yaml] [--key value ...]`; without a YAML file `default_config` is read (if given). Lists
    in YAML become space-separated values, dicts become JSON strings (e.g. `hypergradient_kwargs`), and `null` sets
    the field to `None` (unless a flag sets it). A removed option (see `REMOVED_OPTIONS`), in the file or as a flag,
    raises an error that names its replacement.

    Returns:
        `tuple`: one instance per dataclass type.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = argv.pop(0) if argv and argv[0].endswith((".yaml", ".yml")) else default_config
    config: dict[str, Any] = {}
    if config_path is not None:
        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
    names = [{f.name for f in dataclasses.fields(t)} for t in dataclass_types]
    flag_values = _flag_values(argv)
    flagged = set(flag_values)
    removed = sorted((set(config) | flagged) & set(REMOVED_OPTIONS) - set().union(*names))
    if removed:
        raise ValueError(_removed_message(removed, {**config, **flag_values}))
    unknown = sorted(set(config) - set().union(*names))
    if unknown:
        raise ValueError(
            f"Unknown keys {unknown} in {config_path}: not fields of {[t.__name__ for t in dataclass_types]}."
        )
    nulls = {key for key, value in config.items() if value is None and key not in flagged}
    given = {key: value for key, value in config.items() if value is not None}
    parsed = HfArgumentParser(dataclass_types).parse_args_into_dataclasses(
        args=_to_argv(given) + argv, look_for_args_file=False
    )
    # `null` is no value argparse can take: such fields are set afterwards, through the dataclass so that its checks
    # run again, where their default is not None already
    results = []
    for obj, fields in zip(parsed, names):
        changes = {key: None for key in nulls & fields if getattr(obj, key) is not None}
        results.append(dataclasses.replace(obj, **changes) if changes else obj)
    return tuple(results)
