"""Numbers as the report writes them, and GitHub Markdown tables of formatted cells.

Each format is a named function in :data:`FORMATS`; a unit of the tidy table maps to a format in
:data:`UNIT_FORMATS`.  Missing values (None, NaN, pandas NA) are written "n/a" by every format.

A timing never travels without what stands behind it: :func:`with_spread` writes one sample as itself
("284.6 (1 sample)", never a median) and several as the median with the interquartile range
("284.6 (280.1–290.3, 10 samples)"); :func:`samples_heading` lets a column whose cells all rest on the same
number of samples say so once, in its heading.
"""

from __future__ import annotations

import math

import pandas as pd

NA = "n/a"
MIB = 2**20


def _milliseconds(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if abs(ms) >= 1 else f"{ms:.2g}"


def _mebibytes(value: float) -> str:
    text = f"{value / MIB:.1f}"
    return "0.0" if text == "-0.0" else text  # a net allocation of a few bytes freed


FORMATS = {
    "ms": _milliseconds,  # seconds shown in ms
    "mib": _mebibytes,  # bytes shown in MiB
    "rate": lambda value: f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}",
    "pct": lambda value: f"{100 * value:.1f}%",  # a fraction shown as a percentage
    "pct100": lambda value: f"{value:.1f}%",  # already a percentage
    "times": lambda value: f"{value:.2f}×",
    "sci": lambda value: f"{value:.1e}",
    "int": lambda value: f"{int(value)}",
    "num": lambda value: f"{value:.4g}",
    "str": str,
}
UNIT_NUMBERS = {  # unit of the tidy table -> (the number as written, the unit written after it)
    "seconds": (_milliseconds, "ms"),
    "bytes": (FORMATS["mib"], "MiB"),
    "relative error": (lambda value: f"{value:.2e}", ""),
}
UNIT_FORMATS = {unit: (lambda value, number=number, suffix=suffix: f"{number(value)} {suffix}".rstrip())
                for unit, (number, suffix) in UNIT_NUMBERS.items()}


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


def sample_count(samples) -> int | None:
    """The number of samples behind a figure, or None where it was not recorded."""
    return None if is_missing(samples) else int(samples)


def has_spread(q25, q75) -> bool:
    return not (is_missing(q25) or is_missing(q75))


def with_spread(value, q25, q75, samples, number, count: bool = True) -> str:
    """A figure with what stands behind it: ``number`` writes each number.  One sample is itself, never a
    median: "284.6 (1 sample)"; several are the median and the interquartile range: "284.6 (280.1–290.3,
    10 samples)"; with ``count`` False the number of samples is left to the column heading.  Where asv
    recorded no count, the range alone (if it recorded one) is shown."""
    if is_missing(value):
        return NA
    n = sample_count(samples)
    text = number(value)
    if n == 1:
        return f"{text} (1 sample)" if count else text
    if n is None and not (has_spread(q25, q75) and q25 != q75):
        return text
    parts = [f"{number(q25)}–{number(q75)}"] if has_spread(q25, q75) else []
    if count and n is not None:
        parts.append(f"{n} samples")
    return f"{text} ({', '.join(parts)})" if parts else text


def fmt_spread(value, q25, q75, samples, kind: str, count: bool = True) -> str:
    """:func:`with_spread` in the format ``kind`` of :data:`FORMATS`."""
    return with_spread(value, q25, q75, samples, FORMATS[kind], count)


def fmt_unit_spread(value, q25, q75, samples, unit: str) -> str:
    """:func:`with_spread` of a tidy row in its own unit: "284.6 ms (280.1–290.3, 10 samples)"."""
    if is_missing(value):
        return NA
    number, suffix = UNIT_NUMBERS.get(unit, (lambda v: f"{v:.4g}", unit))
    text = with_spread(value, q25, q75, samples, number)
    head, _, rest = text.partition(" (")
    return f"{head} {suffix}".rstrip() + (f" ({rest}" if rest else "")


def samples_heading(samples) -> tuple[str, bool]:
    """For a column of figures resting on ``samples`` (one count per figure shown): what its heading adds,
    and whether each cell must name its own count (counts that differ).  All single samples: " (1 sample)"
    (not a median, no spread); all n > 1: ", median (q25–q75) of n samples"."""
    counts = [sample_count(value) for value in samples]
    known = {n for n in counts if n is not None}
    if not known:
        return "", False  # no statistics recorded: the values alone
    if len(known) == 1 and None not in counts:
        n = known.pop()
        return (" (1 sample)", False) if n == 1 else (f", median (q25–q75) of {n} samples", False)
    return ", median (q25–q75) or 1 sample", True


def samples_phrase(samples) -> str:
    """The samples behind a set of figures in words, for a plot's axis or note."""
    known = sorted({n for n in (sample_count(value) for value in samples) if n is not None})
    if not known:
        return "samples not recorded"
    if known == [1]:
        return "1 sample each: not a median, no spread"
    if known[0] == 1:
        return f"1 sample or the median of up to {known[-1]}; bars: q25–q75"
    if len(known) == 1:
        return f"median of {known[0]} samples; bars: q25–q75"
    return f"median of {known[0]}–{known[-1]} samples; bars: q25–q75"


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
