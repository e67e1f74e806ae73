"""capsbench: a benchmarking and profiling harness for Capsule Networks (Sabour, Frosst & Hinton 2017).

``harness`` holds the one definition of the network (:mod:`harness.spec`, :mod:`harness.params`), the
implementation registry (:mod:`harness.registry`) and the tools around it: data, training, parity
checking, memory sampling and reporting.  It holds no framework code; that lives in ``implementations``.
"""

__version__ = "0.1.0"
