"""The Markdown table writer."""

from __future__ import annotations

import pytest

from metatrain.tables import markdown_table


def test_a_table_escapes_pipes_fills_short_rows_and_aligns_numbers_right():
    text = markdown_table(["name", "x", "y"], [["a|b", 1, 2.5], ["c"]], right_from=1)
    assert text.splitlines() == [
        "| name | x | y |",
        "| --- | ---: | ---: |",
        "| a\\|b | 1 | 2.5 |",
        "| c |  |  |",
    ]


def test_a_row_longer_than_the_header_is_refused():
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        markdown_table(["a", "b"], [[1, 2, 3]])
