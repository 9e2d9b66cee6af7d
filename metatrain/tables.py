"""The one Markdown table writer of the docs, recipes and benchmarks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], right_from: int | None = None) -> str:
    """A Markdown table: the header, a separator, and one line per row.

    Args:
        header (`Sequence[str]`): the column titles.
        rows (`Iterable[Sequence[Any]]`): the cells of each row, written with `str` (`|` escaped); a row shorter
            than the header is filled with empty cells.
        right_from (`int`, *optional*): the first right-aligned column (numbers); by default none is.

    Returns:
        `str`: the table, without a trailing newline.
    """
    width = len(header)
    align = ["---" if right_from is None or i < right_from else "---:" for i in range(width)]

    def line(cells: Sequence[Any]) -> str:
        if len(cells) > width:
            raise ValueError(f"A row has {len(cells)} cells for {width} columns: {list(cells)}.")
        text = [str(c).replace("|", "\\|") for c in cells] + [""] * (width - len(cells))
        return "| " + " | ".join(text) + " |"

    return "\n".join([line(header), "| " + " | ".join(align) + " |", *(line(row) for row in rows)])
