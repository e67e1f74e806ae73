"""What the harness measures and derives about a step and a machine: analytic FLOPs and expected memory, the
hardware and GEMM peaks and the FMA microbenchmark, NVML and host memory, a step's GPU memory, machine facts."""
