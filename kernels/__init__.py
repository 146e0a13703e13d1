"""GPU kernels (Triton) for the hot sparse operations, each behind the same function as its
pure-PyTorch reference; the registry picks the kernel or the reference per device."""
