"""How close an implementation must come to the float64 reference: one tolerance per dtype and kind of
quantity (output, gradient, parameter after Adam), as normwise relative errors (harness.check).

Kept apart from :mod:`harness.check` so that what reads results files (the report's parity marks,
:mod:`harness.reporting.ranking`) holds a figure to the same tolerances without loading the implementation registry
that the check imports.  Why the float32 parameter tolerance is the widest: harness.check's docstring and
docs/correctness.md.
"""

from __future__ import annotations

TOLERANCES = {
    "float64": {"output": 1e-10, "gradient": 1e-9, "parameter": 1e-8},
    "float32": {"output": 2e-5, "gradient": 1e-3, "parameter": 1e-2},
}


def widest_tolerance() -> float:
    """The widest tolerance of any kind in any dtype: the most one largest error over every quantity of a
    check may be and still pass (the suite records only that largest error)."""
    return max(value for by_kind in TOLERANCES.values() for value in by_kind.values())
