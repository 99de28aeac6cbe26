"""Custom kernels XLA calls through its FFI: cpu_matmul.cc, the CPU's weight-only int8
products and decode-time attention products (`cpu` builds and registers them)."""
