"""The one writer of tables: rows of cells to Markdown lines or CSV text.

Every table metaseg writes (``eval.md``, ``eval.csv``, the summary a run ends with, ``metaseg-report``,
the study and comparison scripts) goes through here, so they share one rule line, one alignment and
one way of writing a missing value. Cells are formatted by the caller (what a number means and how
many digits it deserves is the table's business); this module only lays them out.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Iterable, Sequence


def _columns(align: str, count: int) -> list[bool]:
    """``align``: one letter per column, ``l`` (left) or ``r`` (right), or one letter for every column;
    with more columns than letters the last letter repeats. Returns right-alignment flags."""
    if not align or set(align) - {"l", "r"}:
        raise ValueError(f"align={align!r}: use letters l and r")
    return [(align[i] if i < len(align) else align[-1]) == "r" for i in range(count)]


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]], align: str = "l",
                   pad: bool = False) -> list[str]:
    """The Markdown lines of a table: header, rule (``---`` or ``---:`` for a right-aligned column), rows.

    ``pad``: columns padded to their widest cell, for a table that reads as well in a terminal as
    rendered (the console summary); otherwise cells are written as they are (tables to paste)."""
    head = [str(c) for c in header]
    body = [[str(c) for c in row] for row in rows]
    right = _columns(align, len(head))
    if not pad:
        rule = "|" + "".join("---:|" if r else "---|" for r in right)
        return ["| " + " | ".join(head) + " |", rule, *["| " + " | ".join(cells) + " |" for cells in body]]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|"
    return [line(head), rule, *[line(cells) for cells in body]]


def _csv_cell(value: Any) -> Any:
    """A missing value (None, NaN) is an empty cell; anything else as ``csv`` writes it (floats in full)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value


def csv_text(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text (``\\n`` line ends): the header, then one line per row."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_csv_cell(v) for v in row])
    return buf.getvalue()
