"""The NumPy implementation: forward and hand-written backward over an array module."""
