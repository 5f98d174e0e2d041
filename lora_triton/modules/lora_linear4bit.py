"""``LoRALinear4bit``: the drop-in QLoRA layer.

State-dict layout follows PEFT's LoRA layer around a bitsandbytes base, so both ecosystems
read it: ``base_layer.weight`` (+ bitsandbytes' ``weight.absmax`` ... keys), ``base_layer.bias``,
``lora_A.<adapter>.weight`` ``[r, in]``, ``lora_B.<adapter>.weight`` ``[out, r]``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..format import NF4Weight
from ..ops import check_backend, lora_nf4_linear, nf4_linear, resolve_backend
from ..ops.multi_lora import mixed_nf4_linear
from .adapter_bank import MixedBatch, constant, per_token_ids, stack_adapters
from .nf4_linear import NF4Linear

def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: ``init_lora_weights`` values ``reset_adapter`` knows.
INIT_LORA_WEIGHTS = (True, False, "kaiming", "gaussian")


def check_adapter_hyperparameters(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights=True) -> None:
    """Raise ``ValueError``/``TypeError`` naming the field unless the adapter's hyper-parameters
    are valid: ``r`` a positive int, ``lora_alpha`` a finite number, ``lora_dropout`` in [0, 1),
    ``use_rslora`` a bool, ``init_lora_weights`` one of ``INIT_LORA_WEIGHTS``."""
    if not any(init_lora_weights is v if isinstance(v, bool) else init_lora_weights == v for v in INIT_LORA_WEIGHTS):
        raise ValueError(f"unknown init_lora_weights {init_lora_weights!r}; expected one of {INIT_LORA_WEIGHTS} "
                         "(lora_triton.training has PiSSA, OLoRA, LoftQ and other warm starts)")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"rank r must be a positive int, got {r!r}")
    if not _is_real(lora_alpha) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
    if not _is_real(lora_dropout) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
    if not isinstance(use_rslora, bool):
        raise TypeError(f"use_rslora must be True or False, got {use_rslora!r}")


def lora_scale(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear4bit(nn.Module):
    """``y = x @ dequant(W)^T + b + s * (drop(x) @ A^T) @ B^T`` with a frozen NF4 ``W``.

    Build it with ``from_linear`` (quantizes an ``nn.Linear``), ``from_bnb`` (shares a
    bitsandbytes ``Linear4bit``'s bytes) or from an ``NF4Linear``. Several named adapters may
    exist; one is active (it trains, unless ``set_trainable_adapters`` names several).
    ``layer(x, adapter_names=[...])`` runs a mixed batch: each row of ``x [B, ..., in]`` with the
    adapter named for it (``"__base__"``: none), PEFT's interface (``adapter_bank.py``). ``backend``
    (``"auto"``, ``"triton"``, ``"torch"``, alias ``"reference"``; default env ``LORA_TRITON_BACKEND``)
    chooses the kernels: Triton on CUDA, plain torch on CPU unless forced. PEFT's ``LoraLayer`` names work too:
    ``update_layer``, ``active_adapters``, ``disable_adapters``, ``enable_adapters``, ``merged_adapters``;
    ``adapter_name=None`` builds a layer with no adapter yet.
    """

    def __init__(self, base_layer: NF4Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: str | bool = True, adapter_name: str | None = "default",
                 train_bias: bool = False, backend: str | None = None):
        super().__init__()
        if not isinstance(base_layer, NF4Linear):
            raise TypeError(f"base_layer must be an NF4Linear, got {type(base_layer).__name__}")
        check_backend(backend)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None  # set while an adapter is merged into the NF4 base
        self._unmerged_nf4: NF4Weight | None = None
        self.backend = backend
        self.router = None  # set by integration.enable_adapter_names: the model's mixed-batch routing
        if base_layer.bias is not None:
            base_layer.bias.requires_grad_(train_bias)
        if adapter_name is not None:  # None: a layer with no adapter yet (add them with update_layer)
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 16, blocksize: int = 64,
                    double_quant: bool = True, **kwargs) -> "LoRALinear4bit":
        """Quantize ``linear`` to NF4 and wrap it with a fresh adapter."""
        return cls(NF4Linear.from_linear(linear, blocksize, double_quant), r, lora_alpha, **kwargs)

    @classmethod
    def from_bnb(cls, layer: nn.Module, r: int = 8, lora_alpha: float = 16, **kwargs) -> "LoRALinear4bit":
        """Wrap a quantized ``bitsandbytes.nn.Linear4bit`` (NF4), sharing its bytes."""
        return cls(NF4Linear.from_bnb(layer), r, lora_alpha, **kwargs)

    @classmethod
    def from_nf4(cls, weight: NF4Weight, bias: torch.Tensor | None = None, r: int = 8, lora_alpha: float = 16,
                 **kwargs) -> "LoRALinear4bit":
        """Wrap NF4 data (an ``NF4Weight``) and an optional bias."""
        return cls(NF4Linear(weight, bias), r, lora_alpha, **kwargs)

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, name: str, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: str | bool = True) -> None:
        """Add adapter ``name`` (``A [r, in]``, ``B [out, r]``, fp32) and make it the active one."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        check_adapter_hyperparameters(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        device = self.base_layer.nf4.device
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)
        self.r[name], self.lora_alpha[name], self.lora_dropout[name] = r, lora_alpha, lora_dropout
        self.use_rslora[name] = use_rslora
        self.scaling[name] = lora_scale(r, lora_alpha, use_rslora)
        self.reset_adapter(name, init_lora_weights)
        self.set_adapter(name)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config=None, **options) -> None:
        """PEFT's ``LoraLayer.update_layer``: add adapter ``adapter_name`` and make it active. ``config``
        (a ``peft.LoraConfig``, optional) and keyword ``options`` give ``lora_dropout``,
        ``init_lora_weights`` and ``use_rslora``; PEFT options this layer does not implement (``use_dora``,
        ``lora_bias``, ...) are refused unless off."""
        known = ("lora_dropout", "init_lora_weights", "use_rslora")
        unsupported = ("use_dora", "lora_bias", "use_qalora", "use_alora")
        chosen = {"lora_dropout": 0.0, "init_lora_weights": True, "use_rslora": False}
        if config is not None:
            chosen.update({key: getattr(config, key) for key in known if hasattr(config, key)})
            options = {**{key: getattr(config, key) for key in unsupported if hasattr(config, key)}, **options}
        chosen.update({key: options.pop(key) for key in known if key in options})
        refused = sorted(key for key, value in options.items() if value not in (False, None))
        if refused:
            raise ValueError(f"LoRALinear4bit does not implement {refused} (plain LoRA only)")
        self.add_adapter(adapter_name, r, lora_alpha, chosen["lora_dropout"], chosen["use_rslora"],
                         chosen["init_lora_weights"])

    # PEFT's names for the adapter state
    @property
    def active_adapters(self) -> list[str]:
        """The adapters the forward applies (PEFT's ``active_adapters``): ``[active_adapter]`` or ``[]``."""
        return [] if self.active_adapter is None else [self.active_adapter]

    @property
    def disable_adapters(self) -> bool:
        """True while the layer computes the base output only (PEFT's ``disable_adapters``)."""
        return self.disabled

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's ``enable_adapters``: ``False`` computes the base output only until ``True``."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        if not enabled:
            self._check_unmerged("disable the adapter")
        self.disabled = not enabled

    @property
    def merged_adapters(self) -> list[str]:
        """The adapters merged into the NF4 base (PEFT's ``merged_adapters``)."""
        return [] if self.merged_adapter is None else [self.merged_adapter]

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    def reset_adapter(self, name: str, init: str | bool = True) -> None:
        """Initialise adapter ``name``: ``True``/``"kaiming"`` is PEFT's default (A Kaiming-uniform,
        B zero), ``"gaussian"`` draws A from N(0, 1/r) with B zero, ``False`` leaves both random
        (non-zero B: for tests)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init is True or init == "kaiming":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r[name])
                nn.init.zeros_(b)
            elif init is False:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.normal_(b, std=1.0 / math.sqrt(self.r[name]))
            else:
                raise ValueError(f"unknown init_lora_weights {init!r}; expected True, False, 'kaiming' or 'gaussian'")

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the active adapter; only its parameters require grad."""
        self._check_unmerged(f"set adapter {name!r}")
        if name not in self.lora_A:
            raise KeyError(f"no adapter named {name!r}; have {list(self.lora_A)}")
        self.active_adapter = name
        self.set_trainable_adapters([name])

    def set_trainable_adapters(self, names) -> None:
        """Let exactly the adapters ``names`` (those this layer has) require grad, for training
        several at once on a mixed batch (``adapter_names``); the active adapter is unchanged.
        Raises ``ValueError`` for a name no adapter of this layer has, before changing anything."""
        names = [names] if isinstance(names, str) else list(names)
        unknown = sorted(set(names) - set(self.lora_A))
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; have {list(self.lora_A)}")
        for other in self.lora_A:
            for module in (self.lora_A[other], self.lora_B[other]):
                module.weight.requires_grad_(other in names)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; if it was active, no adapter is active afterwards."""
        self._check_unmerged(f"delete adapter {name!r}")
        if name not in self.lora_A:
            raise KeyError(f"no adapter named {name!r}; have {list(self.lora_A)}")
        del self.lora_A[name], self.lora_B[name]
        for table in (self.r, self.lora_alpha, self.lora_dropout, self.use_rslora, self.scaling):
            del table[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the layer computes the base output only."""
        self._check_unmerged("disable the adapter")
        previous, self.disabled = self.disabled, True
        try:
            yield self
        finally:
            self.disabled = previous

    # ---------------------------------------------------------------- merging
    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """The adapter's update ``s * B @ A``, float32 ``[out, in]`` (default: the active adapter)."""
        name = name or self.active_adapter
        if name not in self.lora_A:
            raise KeyError(f"no adapter named {name!r}; have {list(self.lora_A)}")
        a, b = self.lora_A[name].weight.detach().float(), self.lora_B[name].weight.detach().float()
        return self.scaling[name] * (b @ a)

    def merged_weight(self, dtype: torch.dtype = torch.float32, name: str | None = None) -> torch.Tensor:
        """``dequant(W) + s * B @ A`` computed in float32, then cast once to ``dtype``: the
        weight the adapter was trained against, ``[out, in]``."""
        return (self.base_layer.nf4.dequantize(torch.float32) + self.delta_weight(name)).to(dtype)

    def merge_to_linear(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """A plain ``nn.Linear`` (weight and bias in ``dtype``) computing the active adapter's output."""
        if self.merged_adapter is not None:
            raise RuntimeError("the adapter is merged into the NF4 base; unmerge() first")
        bias = self.base_layer.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=dtype,
                           device=self.base_layer.nf4.device)
        with torch.no_grad():
            linear.weight.copy_(self.merged_weight(dtype))
            if bias is not None:
                linear.bias.copy_(bias)
        return linear.requires_grad_(False)

    def merge_nf4(self) -> None:
        """Re-quantize ``dequant(W) + s*B@A`` to NF4 (same block size and double quant) as the new
        base; the layer then computes the base only. The old bytes are kept for ``unmerge``."""
        self._check_unmerged("merge again")
        name = self.active_adapter
        if name is None:
            raise RuntimeError("no active adapter to merge")
        old = self.base_layer.nf4
        self.base_layer.nf4 = NF4Weight.quantize(self.merged_weight(old.dtype), old.blocksize, old.double_quant)
        self._unmerged_nf4, self.merged_adapter = old, name

    def unmerge(self) -> None:
        """Undo ``merge_nf4`` exactly: restore the original NF4 bytes, use the adapter again."""
        if self.merged_adapter is None:
            raise RuntimeError("nothing is merged")
        self.base_layer.nf4, self._unmerged_nf4, self.merged_adapter = self._unmerged_nf4, None, None

    def _check_unmerged(self, action: str) -> None:
        if self.merged_adapter is not None:
            raise RuntimeError(f"cannot {action} while adapter {self.merged_adapter!r} is merged; unmerge() first")

    # ---------------------------------------------------------------- compute
    def forward(self, x: torch.Tensor, adapter_names=None) -> torch.Tensor:
        """``[..., in] -> [..., out]`` with the active adapter; with ``adapter_names`` (a list of
        adapter names, ``"__base__"`` for none, one per row of ``x``'s first dim; or an int64
        tensor of indices into ``list(self.lora_A)``, -1 for none) each row uses its own adapter.
        A model set up by ``integration.enable_adapter_names`` passes the names down itself."""
        mixed = self._mixed_batch(x, adapter_names)
        if mixed is not None:
            return self._mixed_forward(x, mixed)
        name = self.active_adapter
        if self.disabled or name is None or self.merged_adapter is not None:
            return self.base_layer(x)
        return self._single_forward(x, name)

    def _single_forward(self, x: torch.Tensor, name: str | None) -> torch.Tensor:
        """Every row with adapter ``name`` (None: the base product alone, through the same op)."""
        if name is None:
            return nf4_linear(x, self.base_layer.nf4, self.base_layer.bias, self.backend)
        return lora_nf4_linear(x, self.base_layer.nf4, self.lora_A[name].weight, self.lora_B[name].weight,
                               self.scaling[name], self.base_layer.bias, self.lora_dropout[name],
                               self.training, self.backend)

    def _mixed_batch(self, x: torch.Tensor, adapter_names) -> MixedBatch | None:
        """The mixed batch of this call: the one given, the model's (``router``), or None."""
        if adapter_names is None:
            mixed = None if self.router is None else self.router.current
        else:
            mixed = MixedBatch.from_names(adapter_names, tuple(self.lora_A), x.device, "this layer")
        if mixed is None:
            return None
        if self.merged_adapter is not None:
            raise ValueError(f"cannot pass adapter_names while adapter {self.merged_adapter!r} is merged into the NF4 "
                             "base; unmerge() first")
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ValueError("adapter_names needs x with a batch dimension [B, ..., in_features], got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        return mixed.for_batch(x.shape[0])

    def _mixed_forward(self, x: torch.Tensor, mixed: MixedBatch) -> torch.Tensor:
        """Base product once for the whole batch, then each row's LoRA term from its adapter."""
        if self.disabled:
            return self.base_layer(x)
        if mixed.uniform is not None:  # one adapter (or none) for every row: the single-adapter path
            return self._single_forward(x, mixed.uniform if mixed.uniform in self.lora_A else None)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x2d = x.reshape(-1, self.in_features)
        ids = per_token_ids(mixed.ids, x2d.shape[0])
        bank = stack_adapters(self, mixed.slots, ids, x.dtype, mixed.used)
        if bank is None:  # none of the batch's adapters lives in this layer
            return nf4_linear(x, self.base_layer.nf4, self.base_layer.bias, self.backend)
        dropout = None
        if self.training and any(bank.dropout):
            dropout = constant(bank.dropout, torch.float32, x.device)
        # bank.ids come from the bank's lookup table: in range by construction, no need to read them
        y = mixed_nf4_linear(x2d, self.base_layer.nf4, self.base_layer.bias, bank.a, bank.b, bank.scales, bank.ids,
                             dropout, self.training, self.backend)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        name = self.active_adapter
        base = self.base_layer  # its metadata: readable while FSDP2 holds the NF4 bytes sharded
        adapter = (f"r={self.r[name]}, lora_alpha={self.lora_alpha[name]}, scale={self.scaling[name]:.4g}, "
                   f"dropout={self.lora_dropout[name]}" if name else "no active adapter")
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapter={name!r}, {adapter}, "
                f"blocksize={base.blocksize}, double_quant={base.double_quant}")
