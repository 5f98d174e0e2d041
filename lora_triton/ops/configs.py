"""Kernel configs as data: ``kernel_configs.json`` beside the dispatch table, loaded and validated here.

The file holds each kernel's tiles (the S kernel's per activation width and rank, the skinny kernel's
defaults and the configs the benchmark times, the merged kernel's tile widths, the dx and the
experimental fused kernel's autotune lists and fixed configs) and the limits of the GPUs the package
is built for; each group carries a ``why``. The functions below choose among them for one GPU
(``runtime.gpu_limits``: None under the interpreter, which has no limits) by each kernel module's
shared-memory bound, and ``first_fitting`` moves to the next config should Triton still find one too
large. Nothing is read at import: the file is read once, at the first call.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from ..kernels.runtime import GpuLimits, out_of_resources

CONFIGS_PATH = os.path.join(os.path.dirname(__file__), "kernel_configs.json")
CONFIGS_FORMAT = 1
T = TypeVar("T")
R = TypeVar("R")

#: The keys of a skinny config (``kernels.nf4_skinny.launch_skinny``'s tile options), and the token tiles
#: the kernel takes.
SKINNY_KEYS = ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages", "maxnreg", "table", "s_first",
               "scale_weights")
#: Keys an older dispatch table's skinny config may leave out, with the value they mean.
SKINNY_OPTIONAL = {"s_first": False, "scale_weights": False}


@dataclass(frozen=True)
class TileConfig:
    """A tile of a Triton kernel: its ``BLOCK_*`` / ``GROUP_M`` constexprs and launch options."""

    kwargs: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int

    @classmethod
    def of(cls, block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> "TileConfig":
        return cls((("BLOCK_M", block_m), ("BLOCK_N", block_n), ("BLOCK_K", block_k), ("GROUP_M", 8)), num_warps,
                   num_stages)

    @property
    def blocks(self) -> dict[str, int]:
        return dict(self.kwargs)

    def triton(self):
        """The ``triton.Config`` of this tile (triton imported here, at call time)."""
        import triton

        return triton.Config(self.blocks, num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class KernelConfigs:
    """The validated contents of ``kernel_configs.json``."""

    archs: dict[int, GpuLimits]
    s_warps: int
    s_interpreter: tuple[int, int, int]
    s_tiles: tuple[tuple[int, int, tuple[tuple[int, int, int], ...]], ...]  # (elem bytes, max r_pad, tiles)
    skinny: dict
    merged_block_k: tuple[int, int]
    dx: dict
    fused: dict


def _tiles(entries, where: str) -> tuple[TileConfig, ...]:
    out = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 5 and all(isinstance(v, int) and v > 0 for v in entry)):
            raise ValueError(f"{where}: a tile is [BLOCK_M, BLOCK_N, BLOCK_K, warps, stages], got {entry!r}")
        out.append(TileConfig.of(*entry))
    if not out:
        raise ValueError(f"{where}: needs at least one tile")
    return tuple(out)


def parse_configs(text: str) -> KernelConfigs:
    """The configs of a JSON text; ValueError naming the field that is wrong."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != CONFIGS_FORMAT:
        raise ValueError(f"expected {{'format': {CONFIGS_FORMAT}, ...}}")
    archs = {int(arch): GpuLimits(int(arch), int(v["smem_per_block"])) for arch, v in data["gpus"]["archs"].items()}
    s = data["s_kernel"]
    s_tiles = tuple((int(e["elem_bytes"]), int(e["max_r_pad"]), tuple(tuple(int(v) for v in t) for t in e["tiles"]))
                    for e in s["tiles"])
    if any(not tiles or any(len(t) != 3 for t in tiles) for _, _, tiles in s_tiles):
        raise ValueError("s_kernel.tiles: each entry needs tiles of [BLOCK_M, BLOCK_K, stages]")
    skinny = dict(data["skinny"])
    for name in ("decode", "medium", "interpreter"):
        check_skinny_config(dict(skinny[name], split_k=1, table="gather"), f"skinny.{name}")
    for i, config in enumerate(skinny["bench"]):
        check_skinny_config(dict(config, split_k=1, table="gather"), f"skinny.bench[{i}]")
    merged = data["merged"]
    dx, fused = dict(data["dx"]), dict(data["fused"])
    for name, group in (("dx", dx), ("fused", fused)):
        group["autotune"] = _tiles(group["autotune"], f"{name}.autotune")
        group["fixed"] = _tiles(group["fixed"], f"{name}.fixed")
    return KernelConfigs(archs, int(s["warps"]), tuple(s["interpreter"]), s_tiles, skinny,
                         (int(merged["max_block_k"]), int(merged["min_block_k"])), dx, fused)


@functools.lru_cache(maxsize=1)
def configs() -> KernelConfigs:
    """``kernel_configs.json``, read and validated once."""
    with open(CONFIGS_PATH, encoding="utf-8") as f:
        return parse_configs(f.read())


def named_archs() -> dict[int, GpuLimits]:
    """The limits of the GPUs the package is built for, by compute capability (80, 86, 89, 90)."""
    return configs().archs


def _fits(limits: GpuLimits | None, smem: int, num_warps: int = 4) -> bool:
    return limits is None or limits.fits(smem, None, num_warps)


def _from_first_fitting(candidates: Sequence[T], fits: Callable[[T], bool]) -> tuple[T, ...]:
    """``candidates`` from the first that ``fits`` on (the last alone when none does)."""
    for i, candidate in enumerate(candidates):
        if fits(candidate):
            return tuple(candidates[i:])
    return tuple(candidates[-1:])


_FIRST_FITTING: dict[tuple, int] = {}


def first_fitting(key: tuple, candidates: Sequence[T], launch: Callable[[T], R]) -> R:
    """``launch(config)`` with the first of ``candidates`` the GPU can run.

    Triton raises ``OutOfResources`` when a compiled kernel needs more shared memory than the device
    allows, before it runs anything, so the next config is tried; the last one's error propagates.
    The index that launched is remembered per ``key``, which must name the kernel, the device and
    everything else its compile depends on (dtypes, constexprs), so later calls start there."""
    start, too_large = _FIRST_FITTING.get(key, 0), out_of_resources()
    for i in range(start, len(candidates)):
        try:
            out = launch(candidates[i])
        except too_large:
            if i == len(candidates) - 1:
                raise
            continue
        if i != start:
            _FIRST_FITTING[key] = i
        return out
    raise ValueError("first_fitting needs at least one config")


def autotuning() -> bool:
    """False when ``LORA_TRITON_AUTOTUNE=0`` (a GPU test run: fixed configs, no autotune anywhere);
    read at call time."""
    return os.environ.get("LORA_TRITON_AUTOTUNE", "1") != "0"


# ----------------------------------------------------------------------------- the S kernel
def s_kernel_tiles(elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> tuple[tuple[int, int, int], ...]:
    """The S kernel's tiles ``(BLOCK_M, BLOCK_K, stages)`` for activations of ``elem_bytes`` and padded rank
    ``r_pad`` on a GPU with ``limits``, in the order to try them: from the first whose shared-memory bound
    fits (``kernels.lora_s.s_kernel_smem``)."""
    from ..kernels.lora_s import s_kernel_smem

    cfg = configs()
    tiles = next(t for e, max_r, t in cfg.s_tiles if e == min(elem_bytes, 4) and r_pad <= max_r)
    return _from_first_fitting(tiles, lambda t: _fits(limits, s_kernel_smem(*t, elem_bytes, r_pad), cfg.s_warps))


def s_kernel_tile(elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> tuple[int, int, int]:
    """The tile the S kernel launches with first on a GPU with ``limits``."""
    return s_kernel_tiles(elem_bytes, r_pad, limits)[0]


# ----------------------------------------------------------------------------- the skinny kernel
def check_skinny_config(config: dict, where: str = "skinny config") -> None:
    """ValueError naming the field unless ``config`` is a complete, valid skinny config."""
    from ..kernels.nf4_decode import TABLES
    from ..kernels.nf4_skinny import BLOCK_MS

    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a dict, got {config!r}")
    unknown = sorted(set(config) - set(SKINNY_KEYS))
    missing = sorted(set(SKINNY_KEYS) - set(config) - set(SKINNY_OPTIONAL))
    if unknown or missing:
        raise ValueError(f"{where}: unknown keys {unknown}, missing keys {missing}; expected {list(SKINNY_KEYS)}")
    if config["block_m"] not in BLOCK_MS or isinstance(config["block_m"], bool):
        raise ValueError(f"{where}: block_m must be one of {BLOCK_MS}, got {config['block_m']!r}")
    for key in ("block_n", "block_k"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{where}: {key} must be a power of two >= 16, got {value!r}")
    for key in ("split_k", "num_warps", "num_stages"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive int, got {value!r}")
    maxnreg = config["maxnreg"]
    if maxnreg is not None and (isinstance(maxnreg, bool) or not isinstance(maxnreg, int) or not 24 <= maxnreg <= 255):
        raise ValueError(f"{where}: maxnreg must be None or an int in [24, 255] (ptxas' register cap), got "
                         f"{maxnreg!r}")
    for key, default in SKINNY_OPTIONAL.items():
        if not isinstance(config.get(key, default), bool):
            raise ValueError(f"{where}: {key} must be a bool, got {config[key]!r}")
    if config["table"] not in TABLES:
        raise ValueError(f"{where}: table must be one of {TABLES}, got {config['table']!r}")


def skinny_fits(config: dict, elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> bool:
    """True when ``config`` can launch on a GPU with ``limits`` (None: no limits known, the interpreter)."""
    from ..kernels.nf4_skinny import skinny_smem

    return limits is None or limits.fits(skinny_smem(config, elem_bytes, r_pad), config.get("maxnreg"),
                                         config["num_warps"])


def skinny_tuned(r_pad: int, m: int) -> dict:
    """The tuned default for a padded rank and ``m`` tokens, before any GPU limit: ``skinny.decode`` up to
    ``decode_max_m`` tokens (uncapped above ``capped_max_rank``), ``skinny.medium`` beyond (``S`` first
    above ``capped_max_rank``)."""
    s = configs().skinny
    capped = r_pad <= s["capped_max_rank"]
    if m > s["decode_max_m"]:
        return dict(s["medium"], s_first=not capped)
    return dict(s["decode"], maxnreg=s["decode"]["maxnreg"] if capped else None)


def skinny_default_configs(r_pad: int, m: int = 1, elem_bytes: int = 2, limits: GpuLimits | None = None
                           ) -> tuple[dict, ...]:
    """The configs the skinny launch tries without a config of its own, in order: the tuned default, its
    tile with one stage, the interpreter's small tile; from the first whose bound fits ``limits``."""
    first = skinny_tuned(r_pad, m)
    chain = [first, dict(first, num_stages=1), dict(configs().skinny["interpreter"], s_first=first["s_first"])]
    chain = [c for i, c in enumerate(chain) if c not in chain[:i]]
    return _from_first_fitting(chain, lambda c: skinny_fits(c, elem_bytes, r_pad, limits))


def skinny_default(r_pad: int, m: int = 1, elem_bytes: int = 2, limits: GpuLimits | None = None) -> dict:
    """The skinny kernel's default config on a GPU with ``limits`` (the first of ``skinny_default_configs``)."""
    return skinny_default_configs(r_pad, m, elem_bytes, limits)[0]


def skinny_bench_configs() -> tuple[dict, ...]:
    """The configs the GPU benchmark times beside the default."""
    return tuple(dict(c) for c in configs().skinny["bench"])


# ----------------------------------------------------------------------------- merged, dx, fused
def merged_block_ks(blocksize: int, elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> tuple[int, ...]:
    """Column tiles the merged kernel tries, in order: one absmax block at most ``max_block_k`` wide, halved
    down to ``min_block_k``; from the first whose bound fits (``kernels.nf4_dequant.merged_smem``)."""
    from ..kernels.nf4_dequant import merged_smem

    widest, narrowest = configs().merged_block_k
    block_ks, block_k = [], min(blocksize, widest)
    while block_k >= narrowest:
        block_ks.append(block_k)
        block_k //= 2
    return _from_first_fitting(block_ks, lambda b: _fits(limits, merged_smem(b, elem_bytes, r_pad)))


def _smem_of(kernel: str) -> Callable:
    if kernel == "dx":
        from ..kernels.lora_dx import dx_smem

        return dx_smem
    from ..kernels.experimental.fused import fused_smem

    return fused_smem


def tuned_tiles(kernel: str) -> tuple[TileConfig, ...]:
    """Every autotune tile of ``kernel`` (``"dx"`` or ``"fused"``), before the per-GPU pruning."""
    return getattr(configs(), kernel)["autotune"]


def offered_tiles(kernel: str, elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> tuple[TileConfig, ...]:
    """The autotune tiles of ``kernel`` whose shared-memory bound fits ``limits`` (all for None)."""
    smem = _smem_of(kernel)
    return tuple(t for t in tuned_tiles(kernel)
                 if _fits(limits, smem(t.blocks, t.num_stages, elem_bytes, r_pad), t.num_warps))


def fixed_tiles(kernel: str, elem_bytes: int, r_pad: int, limits: GpuLimits | None) -> tuple[TileConfig, ...]:
    """The tiles ``kernel`` tries without autotuning, in order: its ``fixed`` list from the first that fits."""
    smem = _smem_of(kernel)
    return _from_first_fitting(getattr(configs(), kernel)["fixed"],
                               lambda t: _fits(limits, smem(t.blocks, t.num_stages, elem_bytes, r_pad), t.num_warps))


def interpreter_tile(kernel: str) -> dict:
    """The one tile ``kernel`` (``"dx"`` or ``"fused"``) runs under the interpreter (autotuning more than
    one config fails there)."""
    return dict(getattr(configs(), kernel)["interpreter"])


def max_rank(kernel: str) -> int:
    """The largest adapter rank ``kernel`` (``"dx"`` or ``"fused"``) takes: its rank tile lives in registers."""
    return int(getattr(configs(), kernel)["max_rank"])
