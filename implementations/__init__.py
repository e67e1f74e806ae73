"""The implementations of CapsNet shipped with capsbench, one package per framework.

Each module registers its variants with :func:`harness.registry.register` when imported; the registry
imports every module of these packages whose name does not start with ``_`` (those are private helpers).
"""
