"""The JAX implementations: one jitted program per operation."""
