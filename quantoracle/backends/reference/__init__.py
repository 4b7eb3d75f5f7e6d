"""Torch reference backend: exact NVFP4 numerics on any device, the ground truth."""
