"""Layer 7 - training extras: forgetting protection across sequential tasks (``continual``: one
stacked adapter under a projection constraint; ``routing``: one adapter per task, chosen per
sequence from the input), a gradient-spike guard (``spike_guard``), warm-start initialisations
(``inits``) and a causal LM loss without the full logits (``chunked_loss``)."""

from .chunked_loss import causal_lm_loss
from .continual import ContinualLoRA, ContinualLoRALinear4bit, collect_input_grams, make_continual
from .routing import RoutedLoRA, TaskRouter, TaskSignature
from .subspace import SubspaceStats, extend_basis

__all__ = ["causal_lm_loss", "ContinualLoRA", "ContinualLoRALinear4bit", "make_continual", "collect_input_grams",
           "RoutedLoRA", "TaskRouter", "TaskSignature", "SubspaceStats", "extend_basis"]
