"""Memory of fine-tuning: estimated, measured, and the profiler that measures it.

    estimate   ``lora-triton memory``: full / LoRA / QLoRA memory of a LLaMA-style model,
               component by component (``estimate``, ``PRESETS``, ``ModelShape``)
    measure    one real training step per method on a small Llama, against the estimate
    profiling  ``PeakTensorMemory``: the peak of live tensor bytes during a block of code
"""

from .estimate import METHODS, PRESETS, ModelShape, TrainingSetup, estimate, format_table

__all__ = ["METHODS", "PRESETS", "ModelShape", "TrainingSetup", "estimate", "format_table"]
