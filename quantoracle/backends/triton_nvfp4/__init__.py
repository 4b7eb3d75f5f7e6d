"""Triton NVFP4 backend: W4A16 dense GEMM and fused MoE, weights dequantized in registers."""
