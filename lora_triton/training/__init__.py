"""Layer 7 - training extras: forgetting protection across sequential tasks (``continual``),
a gradient-spike guard (``spike_guard``) and warm-start initialisations (``inits``)."""

from .continual import ContinualLoRA, ContinualLoRALinear4bit, collect_input_grams, make_continual
from .subspace import SubspaceStats, extend_basis

__all__ = ["ContinualLoRA", "ContinualLoRALinear4bit", "make_continual", "collect_input_grams",
           "SubspaceStats", "extend_basis"]
