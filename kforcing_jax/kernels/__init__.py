"""Custom kernels XLA calls through its FFI: int8_matmul.cc, the CPU's weight-only int8
products (int8_cpu builds and registers it)."""
