"""The ops layer: every choice of what runs, and the custom ops that make the layers' math differentiable.

Read in this order: ``validate`` (the one validator), ``configs`` (kernel configs as data,
``kernel_configs.json``), ``candidates`` (every way to compute each operation, one registry per
operation), ``dispatch`` (which candidate runs: the measured table, else the rule), ``lora_nf4`` (the
layer's math and its custom ops), ``multi_lora`` (mixed-adapter batches).
"""

from .lora_nf4 import BACKEND_ALIASES, BACKENDS, check_backend, lora_nf4_linear, nf4_linear, resolve_backend
from .multi_lora import multi_lora_add

__all__ = ["lora_nf4_linear", "nf4_linear", "multi_lora_add", "resolve_backend", "check_backend", "BACKENDS",
           "BACKEND_ALIASES"]
