"""The CuPy implementations: the NumPy code on CuPy, and the routing as fused CUDA kernels."""
