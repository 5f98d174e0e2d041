"""Which candidate runs: a per-GPU table of measured winners, and the rule where it has none.

The candidates of each operation live in one registry (``ops.candidates``: ``FORWARD``, ``DX``,
``MIXED``); this module only chooses among them. The table is data: ``dispatch_table.json`` next to
this module, keyed by GPU name (as ``torch.cuda.get_device_name`` says it), then per operation
(``forward``, ``dx``) a list of measured points ``{"m_bucket", "n", "k", "r", "candidate", "config"}``,
written by ``lora-triton bench --what forward --write-dispatch PATH`` from the benchmark's fastest
candidates (``bench/gpu_check.sh`` names this file).

Lookup (``choose``): on the Triton backend, the GPU's point with the same ``(n, k, r)`` and the nearest M
bucket (log scale), if its candidate supports the problem and its config fits the GPU; otherwise the
first candidate of ``candidates.RULE`` that supports it (dequantize + cuBLAS, else plain torch). The
torch backend runs the ``torch`` candidates. A missing or unreadable table gives a warning and the rule;
a point the loader cannot use is dropped with a warning. Nothing is read at import.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings

import torch

from ..kernels.runtime import m_bucket
from .candidates import REGISTRIES, RULE, Candidate, Problem

TABLE_PATH = os.path.join(os.path.dirname(__file__), "dispatch_table.json")
TABLE_FORMAT = 1
#: The operations a table measures (mixed batches run the rule).
OPERATIONS = ("forward", "dx")


# ----------------------------------------------------------------------------- the table
def point_problem(operation: str, point) -> str | None:
    """Why a table point cannot be used (None when it can): a missing or bad field, a candidate the
    operation lacks, or a config its candidate cannot run (only the candidates that take one may have one)."""
    if not isinstance(point, dict):
        return f"a point must be an object, got {point!r}"
    missing = {"m_bucket", "n", "k", "r", "candidate"} - set(point)
    if missing:
        return f"point {point} lacks {sorted(missing)}"
    if not all(isinstance(point[key], int) and not isinstance(point[key], bool) and point[key] > 0
               for key in ("m_bucket", "n", "k", "r")):
        return f"m_bucket, n, k, r must be positive ints in {point}"
    registry = REGISTRIES[operation]
    name, config = point["candidate"], point.get("config")
    if name not in registry:
        return f"unknown candidate {name!r} for {operation} (have {sorted(registry)})"
    if config is None:
        return None
    candidate = registry[name]
    if not candidate.takes_config:
        return f"candidate {name!r} takes no config, got {config!r}"
    try:
        candidate.check_config(config, Problem(torch.device("cpu"), point["m_bucket"], point["n"], point["k"],
                                               point["r"]))
    except (ValueError, TypeError) as err:
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


def choose(operation: str, problem: Problem, table: dict | None = None) -> tuple[Candidate, dict | None]:
    """``(candidate, its config or None)`` of ``operation`` (``"forward"``, ``"dx"``, ``"mixed"``) for
    ``problem`` (module docstring); ``table``: another table than the shipped one. With the shipped
    table the answer is computed once per problem (a ``Problem`` is a small frozen key)."""
    if table is None:  # the rule is part of the key: a process that changes it gets fresh answers
        return _choose_shipped(operation, problem, tuple(RULE[operation]))
    return _choose(operation, problem, table)


def forget_choices() -> None:
    """Drop the cached choices (after the table or ``candidates.RULE`` changed in this process)."""
    load_table.cache_clear()
    _choose_shipped.cache_clear()


@functools.lru_cache(maxsize=4096)
def _choose_shipped(operation: str, problem: Problem, rule: tuple[str, ...]) -> tuple[Candidate, dict | None]:
    return _choose(operation, problem, None)


def _choose(operation: str, problem: Problem, table: dict | None) -> tuple[Candidate, dict | None]:
    registry = REGISTRIES[operation]
    if problem.backend == "triton" and operation in OPERATIONS and problem.device.type == "cuda":
        point = measured_choice(load_table() if table is None else table, problem.gpu, operation, problem)
        if point is not None and point.get("candidate") in registry:
            candidate, config = registry[point["candidate"]], point.get("config")
            if candidate.supports(problem) and config_fits(candidate, config, problem):
                return candidate, config
    for name in RULE[operation]:
        if registry[name].supports(problem):
            return registry[name], None
    raise AssertionError(f"no {operation} candidate supports {problem}")  # the torch candidates take everything


def config_fits(candidate: Candidate, config: dict | None, problem: Problem) -> bool:
    """Whether a table point's config is one the candidate takes and can launch on the problem's GPU (the
    candidates without a ``config_fits`` choose their tiles per GPU themselves)."""
    if config is None:
        return True
    if not candidate.takes_config:
        return False
    try:
        candidate.check_config(config, problem)
    except ValueError:
        return False
    return candidate.config_fits is None or candidate.config_fits(config, problem)


def table_from_rows(rows: list[dict], operation: str | None = None) -> dict:
    """``{"gpus": {gpu: {operation: [points]}}}`` from benchmark rows (``bench/forward.py``'s
    schema: ``device``, ``K``, ``N``, ``r``, ``M``, ``op``, ``method``, ``ms``, ``note``): per point the
    candidate with the lowest median time among those that ran correctly. ``operation``: only that
    one's rows; None: every operation the rows measured (a row without ``op`` is a forward row; a
    ``dx`` row's method may carry the prefix ``dx:``)."""
    registries = {op: REGISTRIES[op] for op in OPERATIONS}
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
        more = f" (and {len(bad) - 1} more)" if bad[1:] else ""
        raise ValueError(f"not a dispatch table to write: {bad[0]}{more}")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    forget_choices()
