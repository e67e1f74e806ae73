"""The PyTorch implementations: autograd (the reference), fused (hand-written backward), compiled, CUDA graphs.

``_conv_plans`` and ``_spectral`` are torch-fused's convolution plans and spectral strategy.
"""
