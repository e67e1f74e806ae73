"""``python -m harness.peak``: this machine's hardware peak, its derivation and the FMA microbenchmark
(the measurement itself is :mod:`harness.measure.peak` and :mod:`harness.measure.fma_peak`)."""

from __future__ import annotations

from harness.measure.peak import machine_hardware_peak


def main() -> None:
    """``python -m harness.peak``: this machine's hardware peak, its derivation and the FMA microbenchmark."""
    peak = machine_hardware_peak()
    print(f"hardware peak: {peak.get('gflops')} GFLOP/s ({peak.get('note')})")
    print(f"FMA microbenchmark: {peak.get('fma_measured_gflops')} GFLOP/s on every core, "
          f"{peak.get('fma_measured_core_gflops')} on one ({peak.get('fma_measured_note')})")


if __name__ == "__main__":
    main()
