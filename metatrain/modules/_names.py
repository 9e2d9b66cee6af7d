"""Submodules of a model chosen by name, with errors that name the bad value and list valid ones."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import nn


def short_list(names: Sequence[str], shown: int = 3) -> str:
    """`a, b, c and 4 more`."""
    names = list(names)
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def named_submodules(model: nn.Module, names: str | Sequence[str], argument: str) -> dict[str, nn.Module]:
    """The submodules of `model` called `names` (as in `model.named_modules()`), in the order given.

    Raises:
        `ValueError`: naming `argument`, for no names, a name given twice, or a name that is not a submodule (with
            the closest valid names, or the model's top-level ones).
    """
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(f"`{argument}` is empty: name at least one submodule of the model, e.g. 'features.0'.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"`{argument}` names {', '.join(map(repr, repeated))} more than once: give each module once.")
    modules = dict(model.named_modules())
    valid = [name for name in modules if name]
    found = {}
    for name in names:
        if not name or name not in modules:
            close = set(difflib.get_close_matches(name, valid, n=5, cutoff=0.6))
            shown = [n for n in valid if n in close] or [n for n in valid if n.count(".") <= 1][:6]
            raise ValueError(
                f"{type(model).__name__} has no submodule {name!r} (in `{argument}`): give names from "
                f"`model.named_modules()`, e.g. {', '.join(map(repr, shown))}."
            )
        found[name] = modules[name]
    return found
