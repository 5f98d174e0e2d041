"""Which kernel runs: a registry of candidates and a per-GPU table of measured winners.

Every forward candidate of ``kernels.lora_forward`` (and each way to compute ``dx``) is a
``Candidate`` with ``supports(problem)`` and ``launch(...)``. The choice is data: the JSON
file ``dispatch_table.json`` next to this module, keyed by GPU name (as
``torch.cuda.get_device_name`` says it), then per operation (``forward``, ``dx``) a list of
measured points ``{"m_bucket", "n", "k", "r", "candidate", "config"}``, written by
``lora-triton bench --what forward --write-dispatch`` from the benchmark's fastest candidates.

Lookup: the GPU's points with the same ``(n, k, r)`` and the nearest M bucket (log scale)
win; no point for the shape, or no table for the GPU -> ``RULE``. A missing, unreadable or
malformed table file gives a warning and the rule, never a crash. Nothing is read at import.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..kernels.runtime import can_launch, m_bucket

TABLE_PATH = os.path.join(os.path.dirname(__file__), "dispatch_table.json")
TABLE_FORMAT = 1
OPERATIONS = ("forward", "dx")


@dataclass(frozen=True)
class Problem:
    """What a dispatch decision may depend on."""

    device: torch.device
    m: int
    n: int
    k: int
    r: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def gpu(self) -> str | None:
        return _gpu_name(self.device) if self.device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _gpu_name(device: torch.device) -> str:
    """The table key of a CUDA device (asked once per device: this runs on every forward)."""
    return torch.cuda.get_device_name(device)


@dataclass(frozen=True)
class Candidate:
    """A way to compute an operation: ``supports(problem)`` says where it may run."""

    name: str
    operation: str
    supports: Callable[[Problem], bool]
    description: str


def _always(problem: Problem) -> bool:
    return True


#: Largest M the skinny kernel is timed and dispatched at (its 32- and 64-token tiles serve medium M;
#: beyond, every further M tile decodes the weight again).
SKINNY_MAX_M = 256


def _rank_tile_fits(problem: Problem) -> bool:
    """The candidates that hold the adapter's rank tile in registers take ranks up to their ``MAX_RANK``."""
    from ..kernels.lora_forward import MAX_RANK

    return problem.r <= MAX_RANK


def _skinny_supports(problem: Problem) -> bool:
    return problem.m <= SKINNY_MAX_M and _rank_tile_fits(problem)


CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("dequant", "forward", _always, "Triton dequantize + cuBLAS (F.linear, addmm)"),
    Candidate("merged", "forward", _always,
              "Triton W + s * B @ A, then one cuBLAS F.linear (no LoRA pass over [M, N]; dequant with dropout)"),
    Candidate("skinny", "forward", _skinny_supports,
              "swap-AB split-K kernel, LoRA and bias fused (decode and medium M)"),
    Candidate("fused", "forward", _rank_tile_fits, "tile GEMM with in-loop NF4 decode, S in the same loop"),
    Candidate("split", "forward", _rank_tile_fits, "S kernel, then the tile GEMM reading S in its epilogue"),
    Candidate("decode", "forward", _rank_tile_fits, "split-K tile kernel with fp32 atomics (superseded by skinny)"),
)}


# --- native CUDA candidate (top-level kernels/, built by CMake; issue 20) -----------------------
def _native_supports(problem: Problem) -> bool:
    # False without the built library, off CUDA, for fp32 and beyond 16 tokens (kernels/README.md)
    from ..kernels.native_skinny import supports

    return supports(problem.device, problem.m, problem.dtype, problem.r)


CANDIDATES["native"] = Candidate("native", "forward", _native_supports,
                                 "CUDA C++ decode-size kernels (kernels/), LoRA and bias fused (M <= 16)")
# --- end of the native candidate -----------------------------------------------------------------


def _fused_dx_supports(problem: Problem) -> bool:
    from ..kernels.lora_dx import MAX_FUSED_K, MAX_RANK  # its weight panels use int32 byte offsets

    return problem.k <= MAX_FUSED_K and problem.r <= MAX_RANK


DX_CANDIDATES: dict[str, Candidate] = {c.name: c for c in (
    Candidate("dequant", "dx", _always, "Triton dequantize + cuBLAS"),
    Candidate("fused", "dx", _fused_dx_supports, "dx kernel reducing over N with in-loop NF4 decode"),
    Candidate("merged", "dx", _always, "dy @ (W + s * B @ A) in one cuBLAS product (dequant with dropout)"),
)}
#: What runs where no measured point applies: dequantize + cuBLAS, the only candidate a GPU
#: table has shown winning so far (H200 runs 1 and 2, bench/RESULTS.md: for dx the fused kernel
#: made the layer's backward 14-67x slower at M >= 1024). A candidate earns other shapes only
#: through a measured table.
RULE = {"forward": "dequant", "dx": "dequant"}


# ----------------------------------------------------------------------------- the table
def point_problem(operation: str, point) -> str | None:
    """Why a table point cannot be used (None when it can): a missing or bad field, a candidate the
    operation lacks, or a config its candidate cannot run (only ``skinny`` takes one)."""
    if not isinstance(point, dict):
        return f"a point must be an object, got {point!r}"
    missing = {"m_bucket", "n", "k", "r", "candidate"} - set(point)
    if missing:
        return f"point {point} lacks {sorted(missing)}"
    if not all(isinstance(point[key], int) and not isinstance(point[key], bool) and point[key] > 0
               for key in ("m_bucket", "n", "k", "r")):
        return f"m_bucket, n, k, r must be positive ints in {point}"
    registry = CANDIDATES if operation == "forward" else DX_CANDIDATES
    candidate, config = point["candidate"], point.get("config")
    if candidate not in registry:
        return f"unknown candidate {candidate!r} for {operation} (have {sorted(registry)})"
    if config is None:
        return None
    if candidate != "skinny":
        return f"candidate {candidate!r} takes no config, got {config!r}"
    from ..kernels.lora_forward import skinny_default
    from ..kernels.nf4_skinny import check_config
    from ..kernels.runtime import padded_rank

    if not isinstance(config, dict):
        return f"a skinny config must be an object, got {config!r}"
    try:
        check_config({**skinny_default(padded_rank(point["r"]), point["m_bucket"]), "split_k": 1, "table": "shfl",
                      **config})
    except ValueError as err:
        return str(err)
    return None


def parse_table(text: str) -> dict:
    """The table of a JSON text: ValueError when it is not a dispatch table at all; a point it cannot
    use (``point_problem``) is dropped with a warning, the rest kept."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or not isinstance(data.get("gpus"), dict):
        raise ValueError(f"expected {{'format': {TABLE_FORMAT}, 'gpus': {{...}}}}")
    gpus = {}
    for gpu, ops in data["gpus"].items():
        if not isinstance(ops, dict):
            raise ValueError(f"{gpu}: expected {{operation: [points]}}, got {ops!r}")
        for op, points in ops.items():
            if op not in OPERATIONS or not isinstance(points, list):
                raise ValueError(f"{gpu}: unknown operation {op!r} or points not a list")
            kept = []
            for point in points:
                problem = point_problem(op, point)
                if problem is None:
                    kept.append(point)
                else:
                    warnings.warn(f"lora-triton: dispatch table point dropped ({gpu}, {op}): {problem}",
                                  RuntimeWarning, stacklevel=3)
            gpus.setdefault(gpu, {})[op] = kept
    return {"format": TABLE_FORMAT, "gpus": gpus}


@functools.lru_cache(maxsize=4)
def load_table(path: str = TABLE_PATH) -> dict:
    """The dispatch table at ``path``; an empty one (with a warning) when it is missing or bad."""
    try:
        with open(path, encoding="utf-8") as f:
            return parse_table(f.read())
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        warnings.warn(f"lora-triton: dispatch table {path} not used ({type(exc).__name__}: {exc}); "
                      f"falling back to the rule {RULE}", RuntimeWarning, stacklevel=2)
        return {"format": TABLE_FORMAT, "gpus": {}}


def measured_choice(table: dict, gpu: str | None, operation: str, problem: Problem) -> dict | None:
    """The table point that decides ``problem`` (same n, k, r; nearest M bucket), or None."""
    points = table["gpus"].get(gpu, {}).get(operation, []) if gpu else []
    same_shape = [p for p in points if (p["n"], p["k"], p["r"]) == (problem.n, problem.k, problem.r)]
    if not same_shape:
        return None
    bucket = math.log2(m_bucket(max(problem.m, 1)))
    return min(same_shape, key=lambda p: (abs(math.log2(p["m_bucket"]) - bucket), p["m_bucket"]))


@functools.lru_cache(maxsize=4096)
def _shipped_choice(gpu: str | None, operation: str, bucket: int, n: int, k: int, r: int) -> dict | None:
    return measured_choice(load_table(), gpu, operation, Problem(torch.device("cpu"), bucket, n, k, r))


def choose(problem: Problem, operation: str = "forward", table: dict | None = None) -> tuple[str, dict | None]:
    """``(candidate name, its config or None)`` for ``problem``; ``"torch"`` (plain torch) where Triton
    cannot run."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    if not can_launch(problem.device):
        return "torch", None
    registry = CANDIDATES if operation == "forward" else DX_CANDIDATES
    if table is None:  # the shipped table: the point per (GPU, M bucket, shape) is looked up once
        point = _shipped_choice(problem.gpu, operation, m_bucket(max(problem.m, 1)), problem.n, problem.k, problem.r)
    else:
        point = measured_choice(table, problem.gpu, operation, problem)
    if (point is not None and registry[point["candidate"]].supports(problem)
            and config_fits(point["candidate"], point.get("config"), problem)):
        return point["candidate"], point.get("config")
    return RULE[operation], None


def config_fits(candidate: str, config: dict | None, problem: Problem) -> bool:
    """Whether a table point's config can launch on the problem's GPU (only ``skinny`` points carry
    one; the other candidates choose their tiles per GPU themselves)."""
    if candidate != "skinny" or problem.device.type != "cuda":
        return True
    from ..kernels.lora_forward import skinny_default
    from ..kernels.nf4_skinny import skinny_fits
    from ..kernels.runtime import gpu_limits, padded_rank

    elem_bytes = torch.empty((), dtype=problem.dtype).element_size()
    limits = gpu_limits(problem.device)
    full = dict(skinny_default(padded_rank(problem.r), problem.m, elem_bytes, limits), **(config or {}))
    return skinny_fits(full, elem_bytes, padded_rank(problem.r), limits)


def choose_method(device: torch.device, m: int, n: int, k: int, r: int) -> str:
    """The forward candidate's name for ``x [m, k]``, ``W [n, k]``, rank ``r`` (see ``choose``)."""
    return choose(Problem(torch.device(device), m, n, k, r))[0]


def choose_dx(device: torch.device, m: int, n: int, k: int, r: int) -> str:
    """How ``dx`` is computed for this problem: a ``DX_CANDIDATES`` name (``"dequant"`` off Triton)."""
    name, _ = choose(Problem(torch.device(device), m, n, k, r), "dx")
    return "dequant" if name == "torch" else name


# ----------------------------------------------------------------------------- writing
def table_from_rows(rows: list[dict], operation: str | None = None) -> dict:
    """``{"gpus": {gpu: {operation: [points]}}}`` from benchmark rows (``bench/forward.py``'s
    schema: ``device``, ``K``, ``N``, ``r``, ``M``, ``op``, ``method``, ``ms``, ``note``): per point the
    candidate with the lowest median time among those that ran correctly. ``operation``: only that
    one's rows; None: every operation the rows measured (a row without ``op`` is a forward row; a
    ``dx`` row's method may carry the prefix ``dx:``)."""
    registries = {"forward": CANDIDATES, "dx": DX_CANDIDATES}
    if operation is not None and operation not in registries:
        raise ValueError(f"operation must be one of {OPERATIONS} or None, got {operation!r}")
    best: dict[tuple, tuple[str, dict]] = {}
    for row in rows:
        op = row.get("op") or "forward"
        candidate = str(row.get("method", "")).removeprefix(f"{op}:")
        if (operation not in (None, op) or op not in registries or candidate not in registries[op]
                or row.get("ms") in (None, "") or row.get("note")):
            continue
        key = (row["device"], op, m_bucket(int(row["M"])), int(row["N"]), int(row["K"]), int(row["r"]))
        if key not in best or float(row["ms"]) < float(best[key][1]["ms"]):
            best[key] = candidate, row
    gpus: dict[str, dict] = {}
    for (gpu, op, bucket, n, k, r), (candidate, row) in sorted(best.items()):
        config = json.loads(row["config"]) if row.get("config") else None
        gpus.setdefault(gpu, {}).setdefault(op, []).append(
            {"m_bucket": bucket, "n": n, "k": k, "r": r, "candidate": candidate, "config": config,
             "ms": round(float(row["ms"]), 5)})
    return {"format": TABLE_FORMAT, "gpus": gpus}


def _point_key(point: dict) -> tuple:
    return point["m_bucket"], point["n"], point["k"], point["r"]


def merge_tables(old: dict, new: dict) -> dict:
    """``old`` with each point that ``new`` measured: a point of ``new`` replaces the point of ``old``
    with the same (GPU, operation, M bucket, n, k, r) and adds itself where there was none; every other
    point of ``old`` stays (a run that measured a few shapes keeps the rest of the table)."""
    merged = {"format": TABLE_FORMAT, "gpus": {}}
    for gpu in sorted(set(old.get("gpus", {})) | set(new.get("gpus", {}))):
        old_ops, new_ops = old.get("gpus", {}).get(gpu, {}), new.get("gpus", {}).get(gpu, {})
        for op in sorted(set(old_ops) | set(new_ops)):
            points = {_point_key(p): p for p in old_ops.get(op, [])}
            points.update({_point_key(p): p for p in new_ops.get(op, [])})
            merged["gpus"].setdefault(gpu, {})[op] = [points[key] for key in sorted(points)]
    return merged


def write_table(table: dict, path: str = TABLE_PATH) -> None:
    """Write ``table`` as JSON and forget the cached copy; ValueError, nothing written, when a point is
    one the loader would drop (``point_problem``)."""
    parse_table(json.dumps(table))
    bad = [problem for ops in table["gpus"].values() for op, points in ops.items() for point in points
           if (problem := point_problem(op, point)) is not None]
    if bad:
        raise ValueError(f"not a dispatch table to write: {bad[0]}" + (f" (and {len(bad) - 1} more)" if bad[1:] else ""))
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    load_table.cache_clear()
    _shipped_choice.cache_clear()
