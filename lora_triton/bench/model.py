"""Model table: whole training steps of a Llama built from a config, ours against PEFT's QLoRA and
PEFT's 16-bit LoRA, same model, same data, same run.

``model="llama"`` (the default) times the Llamas of ``PLANS``; ``model="smollm2"`` (``lora-triton
bench --what model --model smollm2``) SmolLM2-135M's shapes (``demos.smollm2.CONFIG``: hidden 576,
30 layers, 9 query / 3 key-value heads, MLP 1536, vocabulary 49,152, tied embeddings), built from
the config with random weights: the timings do not depend on the values, and the GPU script runs
it without the 98 MB GGUF file (``SMOLLM2_PLANS``).

Contenders (rank ``r`` adapters, ``alpha = 2 r``, on the seven projections of every decoder layer):

``ours``       ``inject_lora``: the projections become ``LoRALinear4bit`` (NF4 base)
``bnb_peft``   the projections become bitsandbytes NF4 ``Linear4bit`` (``quantize_with_bnb``),
               then ``peft.get_peft_model``: the usual QLoRA stack
``peft_lora``  ``peft.get_peft_model`` on the unquantized base: 16-bit LoRA (on a GPU a bf16
               base; on CPU the whole table runs in fp32, see ``PLANS``)
``ours_chunked`` ours with the loss from ``training.causal_lm_loss`` (output head and cross-entropy
               in 4 chunks of the batch's tokens, ``plan["chunk_tokens"]``: no ``[B, T, vocab]``
               float32 logits)

Each contender runs with gradient checkpointing off and on, in eager mode and (not ``--quick``)
under ``torch.compile``. A training step is forward with labels (the model's own loss), backward
and an AdamW step on the adapters. On CPU the three contenders of a setting live side by side and
are stepped in alternating rounds (``timing.cpu_ms_interleaved``), so the load of a shared machine
hits all alike; on a GPU they run one after the other. Per row: tokens/s (batch x seq over the
median step time after warm-up), speed-up over ``peft_lora`` and ``bnb_peft`` at the same setting, peak memory, and the
profile of one step (``torch.profiler``) split into three shares of the time:

``ours``    our ops (``_EagerLoRANF4`` / ``lora_triton::`` ops, our Triton kernels on a GPU) minus
            the matmuls they call: dequantization, casts, dispatch
``matmul``  every GEMM / BLAS call, wherever it is called from
``other``   everything else: attention, norms, loss, optimizer, Python glue

Peak memory: on CUDA ``max_memory_allocated`` / ``max_memory_reserved`` over one step (weights,
optimizer state and activations, absolute). On CPU there is no allocator counter: the model's
bytes and the optimizer state held before the step plus the live-tensor peak of the step
(``memory.profiling.PeakTensorMemory``, the counter ``lora-triton memory --measure`` uses);
nothing is "reserved" there. Targets (GPU): ours >= 1.0x peft_lora's tokens/s and
>= 1.3x bnb_peft's, peak memory <= bnb_peft's; on CPU ours >= 1.0x bnb_peft.
"""

from __future__ import annotations

import functools
import re
import sys
from collections import defaultdict

import torch

from .environment import META_FIELDS, import_bitsandbytes
from .timing import cpu_ms_interleaved, within_budget

IMPLS = ("ours", "bnb_peft", "peft_lora", "ours_chunked")
BASELINES = ("peft_lora", "bnb_peft")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: A ~1B Llama (1.1B parameters, like TinyLlama's shapes).
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)
#: What a 2-core CPU steps through in about a second (23M parameters).
LLAMA_CPU = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=8192)
LLAMA_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128)
#: Per device kind and quick: model config, batch, sequence, dtype, rank, warm-up and timed steps,
#: whether to run torch.compile, tokens per chunk of ``ours_chunked``'s loss (a quarter of the
#: batch). CPU runs fp32: bf16 matmuls on CPUs without AMX are slower than fp32, so a bf16 base
#: would measure the CPU's bf16 emulation, not the layers.
PLANS = {
    ("cuda", False): dict(config=LLAMA_1B, batch=2, seq=2048, dtype=torch.bfloat16, r=16, warmup=3, steps=8,
                          compile=True, chunk_tokens=1024),
    ("cpu", False): dict(config=LLAMA_CPU, batch=2, seq=256, dtype=torch.float32, r=16, warmup=2, steps=5,
                         compile=True, chunk_tokens=128),
    ("cuda", True): dict(config=LLAMA_TINY, batch=2, seq=32, dtype=torch.bfloat16, r=8, warmup=1, steps=2,
                         compile=False, chunk_tokens=16),
    ("cpu", True): dict(config=LLAMA_TINY, batch=2, seq=32, dtype=torch.float32, r=8, warmup=1, steps=2,
                        compile=False, chunk_tokens=16),
}
#: SmolLM2-135M's plans, by (device kind, quick). CPU: short sequences and no torch.compile, so
#: that 4 contenders x checkpointing off/on fit the default budget on 2 cores; --quick keeps the
#: real widths and vocabulary but two layers.
SMOLLM2_PLANS = {
    ("cuda", False): dict(batch=8, seq=1024, dtype=torch.bfloat16, r=16, warmup=3, steps=8, compile=True,
                          chunk_tokens=2048),
    ("cpu", False): dict(batch=2, seq=128, dtype=torch.float32, r=16, warmup=1, steps=3, compile=False,
                         chunk_tokens=64),
    ("cuda", True): dict(batch=2, seq=32, dtype=torch.bfloat16, r=8, warmup=1, steps=2, compile=False,
                         chunk_tokens=16),
    ("cpu", True): dict(batch=2, seq=32, dtype=torch.float32, r=8, warmup=1, steps=2, compile=False,
                        chunk_tokens=16),
}
MODELS = ("llama", "smollm2")
FIELDS = META_FIELDS + ["model", "params_m", "dtype", "batch", "seq", "r", "impl", "compile", "checkpointing",
                        "tokens_per_s", "step_ms", "steps", "x_vs_peft_lora", "x_vs_bnb_peft", "peak_alloc_mib",
                        "peak_reserved_mib", "peak_what", "mem_vs_bnb_peft", "loss", "share_ours_pct",
                        "share_matmul_pct", "share_other_pct", "profile_top", "note"]
PLOT_TITLE = "training steps"

#: Profiler events of our ops: the eager autograd.Functions (ops/lora_nf4.py, ops/multi_lora.py; their
#: backward events add "Backward") and the custom ops under torch.compile.
_OURS_CPU = ("_EagerLayer", "_EagerMixed", "lora_triton::")
_OURS_KERNELS = re.compile(r"_(lora_s|dequant|dequant_merged|skinny|lora_dx|uniform|shrink|expand|fused_forward)_kernel|"
                           r"nf4_lora")
_MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_mkldnn_matmul",
               "aten::mkldnn_linear", "aten::linear_backward"}
_MATMUL_KERNELS = re.compile(r"gemm|gemv|cublas|cutlass|xmma|matmul", re.IGNORECASE)


def plan_for(device_type: str, quick: bool, model: str = "llama") -> dict:
    """The plan (config, batch, seq, dtype, rank, steps, compile, chunk size, ``name``) of
    ``model`` (one of ``MODELS``) on a ``"cuda"`` or ``"cpu"`` device; ``ValueError`` otherwise."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type must be 'cuda' or 'cpu', got {device_type!r}")
    if model == "llama":
        return {**PLANS[(device_type, quick)], "name": "llama"}
    from ..demos.smollm2 import CONFIG

    config = {**CONFIG, "num_hidden_layers": 2} if quick else dict(CONFIG)
    return {**SMOLLM2_PLANS[(device_type, quick)], "config": config, "name": "smollm2-135m shapes"}


def build_model(impl: str, plan: dict, device: torch.device, checkpointing: bool):
    """A fresh Llama of ``plan["config"]`` (seed 0: every contender starts from the same weights) in
    ``plan["dtype"]`` on ``device``, made into contender ``impl``; returns ``(model, note, parameter
    count of the unquantized model)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    config = LlamaConfig(**{"tie_word_embeddings": False, **plan["config"]},
                         max_position_embeddings=max(plan["seq"], 128))
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(plan["dtype"])
    params = sum(p.numel() for p in model.parameters())
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    r = plan["r"]
    if impl in ("ours", "ours_chunked"):
        from ..integration import inject_lora

        with torch.random.fork_rng(devices=[]):  # the same adapter initialisation for both of ours
            torch.manual_seed(1)
            inject_lora(model, PROJECTIONS, r=r, lora_alpha=2 * r)
        note = "inject_lora (LoRALinear4bit, fp32 adapters)" + (
            f", causal_lm_loss in chunks of {plan['chunk_tokens']} tokens" if impl == "ours_chunked" else "")
    else:
        import peft

        if impl == "bnb_peft":
            from ..integration.bnb_base import quantize_with_bnb

            quantize_with_bnb(model, PROJECTIONS, compute_dtype=plan["dtype"])
        lora = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none")
        model = peft.get_peft_model(model, lora)
        note = {"bnb_peft": "bitsandbytes Linear4bit + peft get_peft_model",
                "peft_lora": f"peft get_peft_model on a {str(plan['dtype']).removeprefix('torch.')} base"}[impl]
    model.train()
    return model, note, params


class Trainee:
    """One contender ready to step: model (compiled or not), AdamW on its trainable parameters, a
    fixed random batch."""

    def __init__(self, impl: str, plan: dict, device: torch.device, checkpointing: bool, compiled: bool):
        self.device = device
        self.model, self.note, self.params = build_model(impl, plan, device, checkpointing)
        self.trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trained, lr=1e-4)
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, plan["config"]["vocab_size"], (plan["batch"], plan["seq"]),
                                 generator=gen).to(device)
        if impl == "ours_chunked":
            from ..training import causal_lm_loss

            loss_fn = functools.partial(causal_lm_loss, self.model, chunk_tokens=plan["chunk_tokens"])
        else:
            loss_fn = lambda input_ids: self.model(input_ids=input_ids, labels=input_ids).loss  # noqa: E731
        self.loss = torch.compile(loss_fn) if compiled else loss_fn

    def step(self) -> float:
        """One training step; returns the loss (synchronizes the device)."""
        loss = self.loss(self.ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def held_bytes(self) -> int:
        """Bytes of the model (packed weights included) and of the optimizer state."""
        from ..integration.report import memory_bytes
        from ..memory.profiling import tensor_bytes

        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return memory_bytes(self.model) + tensor_bytes(state)


def median_step_ms(trainees: dict[str, Trainee], warmup: int, steps: int) -> dict[str, tuple[float, float]]:
    """``{impl: (median ms, last loss)}`` of ``steps`` timed steps after ``warmup`` untimed ones, the
    contenders stepped in alternating rounds, so a slow spell of a shared machine hits all alike."""
    losses = {}

    def stepper(impl: str, trainee: Trainee):
        return lambda: losses.__setitem__(impl, trainee.step())  # float(loss) waits for the device

    fns = {impl: stepper(impl, trainee) for impl, trainee in trainees.items()}
    ms = cpu_ms_interleaved(fns, warmup=warmup, min_rounds=steps, max_rounds=steps, min_time_s=0.0)
    return {impl: (ms[impl], losses[impl]) for impl in trainees}


def peak_memory(trainee: Trainee) -> tuple[float, float | None, str]:
    """``(peak MiB, reserved MiB or None, what was measured)`` of one step."""
    mib = 2.0**20
    if trainee.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainee.step()
        return (torch.cuda.max_memory_allocated() / mib, torch.cuda.max_memory_reserved() / mib,
                "cuda max_memory_allocated / max_memory_reserved")
    from ..memory.profiling import PeakTensorMemory

    held = trainee.held_bytes()
    with PeakTensorMemory() as peak:
        trainee.step()
    return (held + peak.peak_bytes) / mib, None, "cpu: model + optimizer state + live-tensor peak of a step"


def _under_ours(event) -> bool:
    while event is not None:
        if event.name.startswith(_OURS_CPU):
            return True
        event = event.cpu_parent
    return False


def profile_shares(trainee: Trainee) -> dict:
    """Shares (%) of one profiled step's time: ours (minus its matmuls), matmul, other; and the
    three ops with the most self time. CPU: self CPU time of every op; CUDA: kernel time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = trainee.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        trainee.step()
    shares, per_op = defaultdict(float), defaultdict(float)
    if cuda:
        for evt in prof.key_averages():
            us = getattr(evt, "self_device_time_total", 0.0)
            if us > 0:
                kind = ("ours" if _OURS_KERNELS.search(evt.key)
                        else "matmul" if _MATMUL_KERNELS.search(evt.key) else "other")
                shares[kind] += us
                per_op[evt.key] += us
    else:
        for evt in prof.events():
            us = evt.self_cpu_time_total
            kind = "matmul" if evt.name in _MATMUL_OPS else "ours" if _under_ours(evt) else "other"
            shares[kind] += us
            per_op[evt.name] += us
    total = sum(shares.values()) or 1.0
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:3]
    return {"share_ours_pct": f"{100 * shares['ours'] / total:.1f}",
            "share_matmul_pct": f"{100 * shares['matmul'] / total:.1f}",
            "share_other_pct": f"{100 * shares['other'] / total:.1f}",
            "profile_top": "; ".join(f"{name} {100 * us / total:.0f}%" for name, us in top)}


def bench_group(impls: tuple[str, ...], plan: dict, device: torch.device, checkpointing: bool,
                compiled: bool) -> dict[str, dict]:
    """Measured fields (no ratios yet) of contenders ``impls`` at one setting, timed together; one
    that fails to build or step is named on stderr and left out."""
    trainees = {}
    for impl in impls:
        why = _available(impl)
        try:
            if why:
                raise RuntimeError(why)
            trainees[impl] = Trainee(impl, plan, device, checkpointing, compiled)
        except Exception as err:  # one broken contender must not hide the others' numbers
            print(f"model {impl} compile={compiled} ckpt={checkpointing}: failed ({type(err).__name__}: {err})",
                  file=sys.stderr)
    warmup = plan["warmup"] + (2 if compiled else 0)  # the first compiled steps compile
    timed = median_step_ms(trainees, warmup, plan["steps"]) if trainees else {}
    measured = {}
    for impl, trainee in trainees.items():
        try:
            peak, reserved, what = peak_memory(trainee)
        except Exception as err:  # the CPU counter is a dispatch mode, which a compiled graph may refuse
            peak, reserved, what = None, None, f"not measured ({type(err).__name__}: {err})"[:120]
        ms, loss = timed[impl]
        measured[impl] = {"tokens_per_s": plan["batch"] * plan["seq"] / ms * 1e3, "step_ms": ms, "loss": loss,
                          "peak_alloc_mib": peak, "peak_reserved_mib": reserved, "peak_what": what,
                          "params": trainee.params, "note": trainee.note, **profile_shares(trainee)}
    del trainees
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return measured


def _available(impl: str) -> str | None:
    """Why ``impl`` cannot run here, or None."""
    import importlib.util

    if not impl.startswith("ours") and importlib.util.find_spec("peft") is None:
        return "peft not installed"
    if impl == "bnb_peft" and import_bitsandbytes() is None:
        return "bitsandbytes not importable"
    return None


def settings(plan: dict, device_type: str) -> list[tuple[bool, bool, tuple[str, ...]]]:
    """``(compiled, checkpointing, contenders timed together)`` in run order: eager before compiled,
    so a spent budget cuts the compiled rows first. On CPU all contenders of a setting are timed
    in alternating rounds (a shared machine's load hits all alike); on a GPU one at a time, since
    CUDA's peak-memory counters are per process."""
    compiles = (False, True) if plan["compile"] else (False,)
    groups = [IMPLS] if device_type == "cpu" else [(impl,) for impl in IMPLS]
    return [(c, ckpt, group) for c in compiles for ckpt in (False, True) for group in groups]


def run(device: torch.device, meta: dict, quick: bool, budget_s: float, model: str = "llama") -> list[dict]:
    """All rows of the model table for ``model`` (one of ``MODELS``; settings past ``budget_s``
    seconds are skipped and named)."""
    from tqdm.auto import tqdm

    plan = plan_for(device.type, quick, model)
    todo = settings(plan, device.type)
    measured = {}
    bar = tqdm(total=len(todo), desc="model", ncols=90, file=sys.stderr)
    for compiled, ckpt, impls in within_budget(todo, budget_s, "model"):
        bar.set_postfix_str(f"{'compile' if compiled else 'eager'} ckpt={'on' if ckpt else 'off'} {','.join(impls)}")
        for impl, fields in bench_group(impls, plan, device, ckpt, compiled).items():
            measured[(compiled, ckpt, impl)] = fields
        bar.update(1)
    bar.close()
    return _rows(measured, plan, meta)


def _mib(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _rows(measured: dict, plan: dict, meta: dict) -> list[dict]:
    """Table rows, with each row's speed-up and memory ratio against the baselines at its setting."""
    cfg = plan["config"]
    name = f"{plan.get('name', 'llama')} h={cfg['hidden_size']} L={cfg['num_hidden_layers']} " \
           f"ff={cfg['intermediate_size']} V={cfg['vocab_size']}"
    rows = []
    for (compiled, ckpt, impl), m in measured.items():
        base = lambda b: measured.get((compiled, ckpt, b))  # noqa: E731
        ratio = {f"x_vs_{b}": f"{m['tokens_per_s'] / base(b)['tokens_per_s']:.3f}" if base(b) else ""
                 for b in BASELINES}
        bnb = base("bnb_peft")
        rows.append({**meta, "model": name, "params_m": f"{m['params'] / 1e6:.1f}",
                     "dtype": str(plan["dtype"]).removeprefix("torch."), "batch": plan["batch"], "seq": plan["seq"],
                     "r": plan["r"], "impl": impl, "compile": int(compiled), "checkpointing": int(ckpt),
                     "tokens_per_s": f"{m['tokens_per_s']:.4g}", "step_ms": f"{m['step_ms']:.4g}",
                     "steps": plan["steps"], **ratio, "peak_alloc_mib": _mib(m["peak_alloc_mib"]),
                     "peak_reserved_mib": _mib(m["peak_reserved_mib"]),
                     "peak_what": m["peak_what"],
                     "mem_vs_bnb_peft": f"{m['peak_alloc_mib'] / bnb['peak_alloc_mib']:.3f}"
                     if bnb and bnb["peak_alloc_mib"] and m["peak_alloc_mib"] else "",
                     "loss": f"{m['loss']:.4f}", "share_ours_pct": m["share_ours_pct"],
                     "share_matmul_pct": m["share_matmul_pct"], "share_other_pct": m["share_other_pct"],
                     "profile_top": m["profile_top"], "note": m["note"]})
    return rows


def print_summary(rows: list[dict]) -> None:
    """One line per row: setting, contender, tokens/s, ratios, peak memory, profile shares."""
    if not rows:
        print("model table: no rows")
        return
    first = rows[0]
    print(f"\nmodel table: {first['model']} {first['dtype']} batch={first['batch']} seq={first['seq']} "
          f"r={first['r']} | {first['device']} | torch {first['torch']}")
    print(f"{'compile':>7} {'ckpt':>4} {'impl':>10} {'tok/s':>9} {'x_vs_peft':>9} {'x_vs_bnb':>8} {'peak MiB':>9} "
          f"{'ours%':>6} {'matmul%':>7} {'other%':>6}")
    for row in rows:
        print(f"{row['compile']:>7} {row['checkpointing']:>4} {row['impl']:>10} {row['tokens_per_s']:>9} "
              f"{row['x_vs_peft_lora'] or '-':>9} {row['x_vs_bnb_peft'] or '-':>8} {row['peak_alloc_mib'] or '-':>9} "
              f"{row['share_ours_pct']:>6} {row['share_matmul_pct']:>7} {row['share_other_pct']:>6}")


def plot(rows: list[dict], path: str, title: str) -> str | None:
    """Bars of tokens/s and of peak memory per setting, one bar per contender; returns the PNG's
    path, or None when matplotlib is missing or there are no rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: {path} not written (pip install 'lora-triton[bench]')")
        return None
    if not rows:
        return None

    def label(row: dict) -> str:
        mode = "compile" if str(row["compile"]) == "1" else "eager"
        return f"{mode}\nckpt {'on' if str(row['checkpointing']) == '1' else 'off'}"

    groups = list(dict.fromkeys(label(row) for row in rows))
    impls = [impl for impl in IMPLS if any(row["impl"] == impl for row in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    width = 0.8 / len(impls)
    for ax, field, ylabel in ((axes[0], "tokens_per_s", "tokens / s"), (axes[1], "peak_alloc_mib", "peak MiB")):
        for i, impl in enumerate(impls):
            values = {label(row): float(row[field] or 0) for row in rows if row["impl"] == impl}
            xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, [values.get(g, 0.0) for g in groups], width, label=impl, color=f"C{i}")
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    first = rows[0]
    fig.suptitle(f"{title}\n{first['model']}, {first['dtype']}, batch {first['batch']} x {first['seq']}, r={first['r']}",
                 fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
