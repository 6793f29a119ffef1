"""Small training recipes shared by the demo, the examples and the benchmarks."""
