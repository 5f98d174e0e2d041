"""Kernels kept for measurement, not dispatched: the benchmark times them and the static report compiles
them, and the forward path never imports them (``docs/kernels.md``: how a candidate earns a place)."""
