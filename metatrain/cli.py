"""Argument parsing for recipes: dataclasses from a YAML config, overridden by `--key value` flags."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from transformers import HfArgumentParser


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
    in YAML become space-separated values, dicts become JSON strings (e.g. `hypergradient_kwargs`).

    Returns:
        `tuple`: one instance per dataclass type.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = argv.pop(0) if argv and argv[0].endswith((".yaml", ".yml")) else default_config
    config: dict[str, Any] = {}
    if config_path is not None:
        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
    parser = HfArgumentParser(dataclass_types)
    return parser.parse_args_into_dataclasses(args=_to_argv(config) + argv, look_for_args_file=False)
