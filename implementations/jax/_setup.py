"""What the JAX implementations set up before JAX is imported, and JAX itself (None where it is not
installed): :mod:`implementations.jax.capsnet` and :mod:`implementations.jax.routing` import jax from here, so
whichever is imported first, GPU preallocation is off before JAX's backend starts."""

from __future__ import annotations

import os

PREALLOCATE_ENV = "XLA_PYTHON_CLIENT_PREALLOCATE"


def configure_environment(environ=os.environ) -> None:
    """Turn JAX's GPU preallocation off (unless the user chose otherwise); must run before JAX's backend
    starts, which reads it once."""
    environ.setdefault(PREALLOCATE_ENV, "false")


configure_environment()

try:
    import jax
    import jax.numpy as jnp
    from jax import lax

    _IMPORT_ERROR = ""
except ImportError as _error:  # the harness lists the JAX implementations as unavailable, with this reason
    jax = jnp = lax = None
    _IMPORT_ERROR = f"jax is not installed ({_error}); install it with pip install -e '.[jax]'"
