"""Layer 4 - autograd / torch.library ops that pick a backend and make compile work."""

from .lora_nf4 import BACKEND_ALIASES, BACKENDS, check_backend, lora_nf4_linear, nf4_linear, resolve_backend

__all__ = ["lora_nf4_linear", "nf4_linear", "resolve_backend", "check_backend", "BACKENDS", "BACKEND_ALIASES"]
