"""Applications built on the library, not part of it: the ``drt-peft`` command (demo, benchmark runner),
loaders of the real offline models and data, and training recipes shared by the demo, the examples and
the benchmarks. ``import drt_peft`` never imports this package."""
