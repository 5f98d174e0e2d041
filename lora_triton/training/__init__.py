"""Layer 7 - training extras: forgetting protection across sequential tasks (``continual``),
a gradient-spike guard (``spike_guard``), warm-start initialisations (``inits``) and a causal LM
loss without the full logits (``chunked_loss``)."""

from .chunked_loss import causal_lm_loss
from .continual import ContinualLoRA, ContinualLoRALinear4bit, collect_input_grams, make_continual
from .subspace import SubspaceStats, extend_basis

__all__ = ["causal_lm_loss", "ContinualLoRA", "ContinualLoRALinear4bit", "make_continual", "collect_input_grams",
           "SubspaceStats", "extend_basis"]
