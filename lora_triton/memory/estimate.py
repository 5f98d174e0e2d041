"""How much memory fine-tuning a LLaMA-style model takes: full, LoRA on a 16-bit base, QLoRA.

A bookkeeping model, component by component (bytes):

* weights      full/LoRA: every parameter in the compute dtype. QLoRA: the seven projection
               matrices per layer in NF4 (4 bits + block statistics, ``NF4Weight.bits_per_weight``
               = 4.127 with double quantization at block size 64), embeddings, norms and the
               LM head in the compute dtype (bitsandbytes/PEFT keep them 16-bit too).
* adapter      rank-r A and B for every projection, ``r * (in + out)`` parameters each.
* gradients    full: one per parameter (compute dtype); LoRA/QLoRA: one per adapter parameter.
* optimizer    Adam's two moments per trained parameter (fp32 by default: 8 bytes), plus an
               fp32 master copy of the weights for full mixed-precision training.
* activations  what autograd saves, per token: for each decoder layer the inputs of the
               norms, projections, attention (q, k, v, output with a fused attention kernel,
               no seq^2 term) and the MLP (gate, up, activation) - about ``8h + 2h_kv + 4i``
               elements; with gradient checkpointing only each layer's input ``h`` plus one
               layer recomputed in full. Plus the logits: 16-bit logits, their fp32 upcast for
               the loss, and its fp32 gradient.

CUDA context, allocator fragmentation and framework workspaces are not modelled; they add
roughly 0.5-2 GB on a real GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

NF4_BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)  # double quant, block size 64


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a LLaMA-style decoder's memory."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tie_embeddings: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def projection_shapes(self) -> list[tuple[int, int]]:
        """``(in, out)`` of the seven projections of one decoder layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    @property
    def projection_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.projection_shapes())

    @property
    def other_params(self) -> int:
        """Embeddings, LM head (unless tied) and RMSNorm weights."""
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.projection_params + self.other_params

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """From a transformers config object or its dict (``config.json``)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "num_attention_heads")
        missing = [k for k in needed if not isinstance(get(k), int) or isinstance(get(k), bool) or get(k) < 1]
        if missing:
            raise ValueError(f"a LLaMA-style config needs positive int fields {missing}")
        heads = get("num_attention_heads")
        return cls(hidden=get("hidden_size"), intermediate=get("intermediate_size"), layers=get("num_hidden_layers"),
                   vocab=get("vocab_size"), heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   tie_embeddings=bool(get("tie_word_embeddings", False)))


#: Published LLaMA shapes (vocab 32000).
PRESETS = {
    "7b": ModelShape(4096, 11008, 32, 32000, 32, 32),
    "13b": ModelShape(5120, 13824, 40, 32000, 40, 40),
    "70b": ModelShape(8192, 28672, 80, 32000, 64, 8),
}


@dataclass(frozen=True)
class TrainingSetup:
    """Batch, sequence, adapter and precision choices."""

    batch: int = 1
    seq: int = 512
    rank: int = 16
    compute_bytes: int = 2  # fp16/bf16 weights and activations
    adapter_bytes: int = 4  # PEFT keeps adapters in fp32
    optimizer_bytes: int = 8  # Adam: two fp32 moments per trained parameter
    master_bytes: int = 4  # fp32 master weights (full fine-tuning in mixed precision)
    gradient_checkpointing: bool = True


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per component for one method."""

    method: str
    weights: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations

    def rows(self) -> list[tuple[str, int]]:
        names = [f.name for f in fields(self) if f.name != "method"]
        return [(name, getattr(self, name)) for name in names] + [("total", self.total)]


METHODS = ("full", "lora", "qlora")


def adapter_params(shape: ModelShape, rank: int) -> int:
    """LoRA parameters on all seven projections of every layer."""
    return shape.layers * sum(rank * (a + b) for a, b in shape.projection_shapes())


def activation_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Bytes autograd keeps between forward and backward (see the module docstring)."""
    tokens = setup.batch * setup.seq
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_layer = 8 * h + 2 * kv + 4 * i + 7 * setup.rank  # elements per token; 7 LoRA S tensors
    if setup.gradient_checkpointing:
        elements = tokens * (shape.layers * h + per_layer)
    else:
        elements = tokens * shape.layers * per_layer
    logits = tokens * shape.vocab * (setup.compute_bytes + 4 + 4)
    return elements * setup.compute_bytes + logits


def estimate(shape: ModelShape, setup: TrainingSetup, method: str) -> MemoryBreakdown:
    """Memory of one training step of ``method`` (``"full"``, ``"lora"``, ``"qlora"``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    acts = activation_bytes(shape, setup)
    if method == "full":
        return MemoryBreakdown(method, shape.params * setup.compute_bytes, 0, shape.params * setup.compute_bytes,
                               shape.params * (setup.optimizer_bytes + setup.master_bytes), acts)
    trained = adapter_params(shape, setup.rank)
    if method == "lora":
        weights = shape.params * setup.compute_bytes
    else:
        weights = round(shape.projection_params * NF4_BITS_PER_WEIGHT / 8) + shape.other_params * setup.compute_bytes
    return MemoryBreakdown(method, weights, trained * setup.adapter_bytes, trained * setup.adapter_bytes,
                           trained * setup.optimizer_bytes, acts)


def format_table(breakdowns: list[MemoryBreakdown], unit: float | None = None, unit_name: str | None = None) -> str:
    """A fixed-width text table, one column per method, in ``unit`` (default: GiB, or the largest of
    GiB / MiB / KiB in which the biggest total is at least 1, so a tiny model does not print zeros)."""
    if unit is None:
        largest = max((b.total for b in breakdowns), default=0)
        unit, unit_name = next(((u, n) for u, n in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"))
                                if largest >= u), (1, "bytes"))
    header = f"{'component':<12}" + "".join(f"{b.method:>12}" for b in breakdowns)
    lines = [header, "-" * len(header)]
    for i, (name, _) in enumerate(breakdowns[0].rows()):
        lines.append(f"{name:<12}" + "".join(f"{b.rows()[i][1] / unit:>12.2f}" for b in breakdowns))
    return "\n".join(lines) + f"\n(values in {unit_name})"


# ----------------------------------------------------------------------------- several GPUs
#: FSDP units whose full weights are on a GPU at once: the layer computing and the next one,
#: all-gathered ahead (FSDP's default prefetch of one unit, forward and backward).
GATHERED_LAYERS = 2


def layer_weight_bytes(shape: ModelShape, setup: TrainingSetup, method: str) -> int:
    """Bytes of one decoder layer's weights as stored (NF4 projections for QLoRA, 16-bit else)."""
    projections = sum(a * b for a, b in shape.projection_shapes())
    norms = 2 * shape.hidden * setup.compute_bytes
    if method == "qlora":
        return round(projections * NF4_BITS_PER_WEIGHT / 8) + norms
    return projections * setup.compute_bytes + norms


def estimate_distributed(shape: ModelShape, setup: TrainingSetup, method: str, gpus: int, fsdp: bool = True,
                         cpu_offload: bool = False) -> MemoryBreakdown:
    """Memory of one GPU when ``gpus`` GPUs train together, ``setup.batch`` sequences each.

    FSDP (``fsdp=True``, FULL_SHARD / FSDP2 ``fully_shard`` per decoder layer): every stored
    tensor - weights (NF4 bytes and block scales included for QLoRA), trained parameters, their
    gradients, the optimizer's moments and master weights - is split ``1/gpus`` per GPU; on top,
    ``GATHERED_LAYERS`` decoder layers are whole at a time (the one computing, the next
    prefetched) and, for QLoRA, the largest projection dequantized to the compute dtype for its
    matmul (a transient the default GPU path of our layer and bitsandbytes both create).
    ``cpu_offload`` keeps every shard (weights, adapters, gradients, optimizer) in CPU memory: the
    GPU then holds only the gathered layers and the activations. Activations are one GPU's batch,
    as on a single GPU.

    Without FSDP (DDP): every GPU holds the whole single-GPU footprint plus DDP's gradient
    buckets, one more copy of the trained gradients.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be a positive int, got {gpus!r}")
    if cpu_offload and not fsdp:
        raise ValueError("cpu_offload needs fsdp (DDP keeps everything on every GPU)")
    single = estimate(shape, setup, method)
    if not fsdp:
        return MemoryBreakdown(method, single.weights, single.adapter, 2 * single.gradients, single.optimizer,
                               single.activations)
    layer = layer_weight_bytes(shape, setup, method)
    working = min(GATHERED_LAYERS, shape.layers) * layer
    if method == "qlora":
        working += max(a * b for a, b in shape.projection_shapes()) * setup.compute_bytes
    if cpu_offload:
        return MemoryBreakdown(method, working, 0, 0, 0, single.activations)
    shard = lambda nbytes: -(-nbytes // gpus)  # noqa: E731 (ceil)
    return MemoryBreakdown(method, shard(single.weights) + (working if gpus > 1 else 0), shard(single.adapter),
                           shard(single.gradients), shard(single.optimizer), single.activations)


def cpu_offload_bytes(shape: ModelShape, setup: TrainingSetup, method: str, gpus: int) -> int:
    """CPU memory per process that ``cpu_offload`` moves off the GPU: its shard of the weights,
    trained parameters, gradients and optimizer state."""
    single = estimate(shape, setup, method)
    return -(-(single.weights + single.adapter + single.gradients + single.optimizer) // gpus)


#: Published FSDP-QLoRA measurements for Llama-2-70B on 2 x 24 GB GPUs (PEFT's FSDP guide,
#: Answer.AI's recipe through accelerate): sequence 2048, 2 sequences per GPU, r=8 on all linear
#: layers, nested quantization, gradient checkpointing, flash attention, bf16.
PUBLISHED_70B_2GPU = {
    "setup": TrainingSetup(batch=2, seq=2048, rank=8, gradient_checkpointing=True),
    "gpu_gb_cpu_offload": 19.6, "cpu_ram_gb_cpu_offload": 107.0, "gpu_gb_no_offload": 35.6,
    "source": "PEFT documentation, 'Use PEFT QLoRA and FSDP for finetuning large models on multiple GPUs' "
              "(huggingface/peft docs/source/accelerate/fsdp.md)",
}
