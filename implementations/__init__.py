"""The implementations of CapsNet shipped with capsbench, one module per framework.

Each module registers its variants with :func:`harness.registry.register` when imported; the registry
imports every module of this package.  The routing of an implementation is in its framework's module,
in a function whose name starts with ``routing``.
"""
