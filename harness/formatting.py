"""Numbers as the report writes them, and GitHub Markdown tables of formatted cells.

Each format is a named function in :data:`FORMATS`; a unit of the tidy table maps to a format in
:data:`UNIT_FORMATS`.  Missing values (None, NaN, pandas NA) are written "n/a" by every format.
"""

from __future__ import annotations

import math

import pandas as pd

NA = "n/a"
MIB = 2**20


def _milliseconds(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if abs(ms) >= 1 else f"{ms:.2g}"


FORMATS = {
    "ms": _milliseconds,  # seconds shown in ms
    "mib": lambda value: f"{value / MIB:.1f}",  # bytes shown in MiB
    "rate": lambda value: f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}",
    "pct": lambda value: f"{100 * value:.1f}%",  # a fraction shown as a percentage
    "pct100": lambda value: f"{value:.1f}%",  # already a percentage
    "times": lambda value: f"{value:.2f}×",
    "sci": lambda value: f"{value:.1e}",
    "int": lambda value: f"{int(value)}",
    "num": lambda value: f"{value:.4g}",
    "str": str,
}
UNIT_FORMATS = {
    "seconds": lambda value: f"{_milliseconds(value)} ms",
    "bytes": lambda value: f"{FORMATS['mib'](value)} MiB",
    "relative error": lambda value: f"{value:.2e}",
}


def is_missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def fmt(value, kind: str) -> str:
    """One value in the format ``kind`` of :data:`FORMATS`; missing values as 'n/a'."""
    if is_missing(value):
        return NA
    if kind == "num" and not isinstance(value, float):
        return str(value)
    return FORMATS[kind](value)


def fmt_unit(value, unit: str) -> str:
    """A value of a tidy row in its own unit: seconds as ms, bytes as MiB, anything else with its unit."""
    if is_missing(value):
        return NA
    return UNIT_FORMATS.get(unit, lambda v: f"{v:.4g} {unit}")(value)


def markdown_table(frame: pd.DataFrame, text_columns: int = 1, left: set[str] = frozenset()) -> str:
    """A GitHub Markdown table of already formatted cells; the first ``text_columns`` and those named in
    ``left`` left-aligned, the rest (numbers) right-aligned."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" if i < text_columns or name in left else "---:"
                             for i, name in enumerate(frame.columns)) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def formatted(frame: pd.DataFrame, columns: dict[str, tuple[str, str]]) -> pd.DataFrame:
    """``frame`` with the ``columns`` (name -> (heading, format kind)) formatted, in that order."""
    return pd.DataFrame({heading: [fmt(value, kind) for value in frame[name]]
                         for name, (heading, kind) in columns.items()})
