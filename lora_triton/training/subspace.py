"""The protected input subspace of one layer: an orthonormal basis grown task by task.

After a task, a layer's calibration inputs ``X [n, K]`` are summarised by their Gram matrix
``G = X^T X`` (float64, accumulated batch by batch). ``extend_basis`` adds to the layer's
basis ``U [K, d]`` the fewest directions (eigenvectors of the part of ``G`` outside
``span(U)``, largest first) that make ``span(U)`` hold a fraction ``energy`` of the task's
input energy ``||X||_F^2 = trace(G)``. The bases of successive tasks are nested, so
``I - U U^T`` only ever shrinks. ``energy = 1.0`` keeps every direction with non-negligible
energy (eigenvalue above ``ZERO_ENERGY_RTOL * trace(G)``): the span of all inputs seen.

Two optional variants of the rule: ``exclude_top`` measures ``energy`` on the variation only
(the top eigen-direction, for uncentered activations roughly the mean input, is protected
outright, so a dominant mean no longer lets a handful of directions pass as 99.9%), and
``rel_threshold`` additionally keeps every direction whose eigenvalue exceeds that fraction of
``lambda_max(G)`` (a relative spectral threshold).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

#: A residual eigenvalue at or below this fraction of the task's energy is float noise, not a
#: direction of the data: float64 eigen-solvers leave ~1e-16 relative, and float32 inputs of
#: exactly low rank produce nothing larger than that either.
ZERO_ENERGY_RTOL = 1e-10


@dataclass
class SubspaceStats:
    """What ``extend_basis`` did for one task on one layer.

    ``total_energy`` = ``||X||_F^2``; ``discarded_energy`` = ``||X (I - U U^T)||_F^2`` with the
    extended ``U``; ``dims_added`` columns were appended; ``energy`` is the requested fraction.
    """

    total_energy: float
    discarded_energy: float
    dims_added: int
    energy: float

    def to_dict(self) -> dict:
        return asdict(self)


def _project_out(basis: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``(I - U U^T) G (I - U U^T)`` for float64 ``U [K, d]``, ``G [K, K]``, symmetrised."""
    p = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device) - basis @ basis.T
    residual = p @ gram @ p
    return (residual + residual.T) / 2


def _directions_to_keep(eigenvalues: torch.Tensor, needed: float, total: float, energy: float,
                        floor: float = 0.0) -> int:
    """How many of the descending ``eigenvalues`` to keep so that their sum reaches ``needed``
    (and at least every eigenvalue above ``floor``)."""
    significant = int((eigenvalues > ZERO_ENERGY_RTOL * total).sum())
    above_floor = min(int((eigenvalues > floor).sum()), significant) if floor > 0 else 0
    if energy >= 1.0:
        return significant
    if needed <= 0:
        return above_floor
    reached = torch.cumsum(eigenvalues, 0) >= needed
    count = int(reached.nonzero()[0, 0]) + 1 if bool(reached.any()) else eigenvalues.numel()
    return max(min(count, significant), above_floor)


def extend_basis(basis: torch.Tensor, gram: torch.Tensor, energy: float, rel_threshold: float = 0.0,
                 exclude_top: bool = False, measure: torch.Tensor | None = None) -> tuple[torch.Tensor, SubspaceStats]:
    """Grow ``basis`` until it holds ``energy`` of the energy in ``gram``.

    Args:
        basis: ``[K, d]`` with orthonormal columns (any float dtype; ``d`` may be 0).
        gram: ``[K, K]`` float64, ``X^T X`` of the task's inputs at this layer.
        energy: fraction in ``[0, 1]``; ``0`` adds nothing (no protection), ``1`` keeps all.
        rel_threshold: also keep every residual direction whose eigenvalue exceeds
            ``rel_threshold * lambda_max(gram)`` (relative spectral threshold; 0 = off).
        exclude_top: measure ``energy`` on the variation only: the top eigen-direction of
            ``gram`` (for uncentered activations, ~the mean input) is protected outright and
            ``span(U)`` must hold ``lambda_max + energy * (trace(G) - lambda_max)``, so the
            discarded energy is at most ``(1 - energy) * (trace(G) - lambda_max)``.
        measure: ``[K, K]`` float64 Gram matrix whose total and discarded energy the stats report
            (default ``gram``): the directions are chosen on ``gram`` (e.g. gradient-weighted
            inputs), the drift bound needs the plain ``X^T X``.
    Returns:
        ``(new_basis [K, d + k] in basis.dtype, stats)``; the first ``d`` columns are ``basis``.
    """
    if not 0.0 <= energy <= 1.0:
        raise ValueError(f"energy must be in [0, 1], got {energy}")
    u = basis.to(torch.float64)
    total = float(torch.trace(gram))
    if total <= 0.0:
        return basis, SubspaceStats(0.0, 0.0, 0, energy)
    already = float(torch.trace(u.T @ gram @ u))
    eigenvalues, eigenvectors = torch.linalg.eigh(_project_out(u, gram))
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp(min=0.0), eigenvectors.flip(1)
    floor = rel_threshold * float(torch.linalg.eigvalsh(gram)[-1]) if rel_threshold > 0 else 0.0
    if exclude_top and 0.0 < energy < 1.0:
        top = float(torch.linalg.eigvalsh(gram)[-1])
        needed = energy * (total - top) + top - already
    else:
        needed = energy * total - already
    k = _directions_to_keep(eigenvalues, needed, total, energy, floor)
    # One re-orthogonalisation pass keeps U orthonormal to float64 precision over many tasks.
    new = eigenvectors[:, :k] - u @ (u.T @ eigenvectors[:, :k])
    new = torch.linalg.qr(new).Q if k else new
    grown = torch.cat([u, new], dim=1)
    measure = gram if measure is None else measure
    total = float(torch.trace(measure))
    discarded = max(total - float(torch.trace(grown.T @ measure @ grown)), 0.0)
    return grown.to(basis.dtype), SubspaceStats(total, discarded, k, energy)


def residual_factor(basis: torch.Tensor, second_moment: torch.Tensor, previous: torch.Tensor,
                    max_rank: int) -> torch.Tensor:
    """A factor ``F [K, m]`` (``m <= max_rank``) of the earlier tasks' input second moment left
    outside ``span(U)``: ``F F^T ~= P (S + F_prev F_prev^T) P`` with ``P = I - U U^T``.

    Args:
        basis: ``[K, d]`` orthonormal, the (already extended) protected basis ``U``.
        second_moment: float64 ``[K, K]``, the ended task's ``X^T X / n`` (mean over its tokens).
        previous: ``[K, m']``, the factor kept after earlier tasks (``m'`` may be 0).
        max_rank: keep the ``max_rank`` largest eigen-directions (0 keeps none).
    Returns:
        float32 ``[K, m]``, columns ``sqrt(lambda_j) v_j`` orthogonal to ``U``, largest first;
        ``||B A F||_F^2`` is then the mean squared change that an adapter ``B A`` (acting only
        outside ``U``) makes to the layer's output on those tasks' inputs (equal weight per task).
    """
    u, prev = basis.to(torch.float64), previous.to(torch.float64)
    moment = second_moment + prev @ prev.T
    eigenvalues, eigenvectors = torch.linalg.eigh(_project_out(u, moment))
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp(min=0.0), eigenvectors.flip(1)
    keep = min(max_rank, int((eigenvalues > ZERO_ENERGY_RTOL * float(eigenvalues.sum().clamp(min=1e-300))).sum()))
    vectors = eigenvectors[:, :keep] - u @ (u.T @ eigenvectors[:, :keep])
    return (vectors * eigenvalues[:keep].sqrt()).to(torch.float32)


def output_factor(moment: torch.Tensor, previous: torch.Tensor, tasks_before: int,
                  shrinkage: float = 0.0) -> torch.Tensor:
    """``H [N, N]`` with ``H H^T`` = the mean over ended tasks of each task's output-gradient second
    moment normalised to mean eigenvalue 1 (``G N / trace(G)``), shrunk towards the identity:
    ``(1 - shrinkage) G N / trace(G) + shrinkage I`` (``shrinkage = 1``: unweighted).

    Args:
        moment: float64 ``[N, N]``, the ended task's ``sum_t g_t g_t^T`` (``g_t`` = gradient of the
            loss of calibration token ``t`` with respect to the layer's output).
        previous: ``[N, N]`` factor kept after the ``tasks_before`` earlier tasks (``[N, 0]``: none).
        tasks_before: how many tasks ``previous`` averages (each task weighs the same).
        shrinkage: in ``[0, 1]``; every output direction keeps at least this weight.
    Returns:
        float32 ``[N, N]``; ``||H^T dW F||_F^2`` is the Kronecker-factored (K-FAC) Fisher quadratic
        form ``tr(G dW C dW^T)`` of a weight change ``dW`` for ``C = F F^T``, with ``G`` normalised.
        A zero moment (no gradient reached the layer) counts as isotropic.
    """
    n = moment.shape[0]
    trace = float(torch.trace(moment))
    eye = torch.eye(n, dtype=torch.float64, device=moment.device)
    metric = (1 - shrinkage) * moment * (n / trace) + shrinkage * eye if trace > 0 else eye
    if previous.shape[1] > 0 and tasks_before > 0:
        prev = previous.to(torch.float64)
        metric = (tasks_before * (prev @ prev.T) + metric) / (tasks_before + 1)
    values, vectors = torch.linalg.eigh((metric + metric.T) / 2)
    return (vectors * values.clamp(min=0.0).sqrt()).to(torch.float32)


def free_directions(basis: torch.Tensor, new_moment: torch.Tensor, residual: torch.Tensor, floor: float,
                    count: int) -> torch.Tensor:
    """The ``count`` input directions outside ``span(U)`` where a new task has the most energy
    per unit of the drift penalty's metric: the top generalized eigenvectors of

        P C P v = lambda (F F^T + floor P) v,     P = I - U U^T,

    ``C`` the new task's input second moment and ``F F^T + floor P`` exactly the quadratic form
    of ``ContinualLoRALinear4bit.drift_penalty`` (``floor = shrinkage * mu``). A block whose
    ``A`` rows span these directions gains the most on the new task for the least penalty.

    Args:
        basis: ``[K, d]`` orthonormal, the protected basis ``U`` (``d < K``).
        new_moment: float64 ``[K, K]``, the new task's ``X^T X / n`` at this layer.
        residual: ``[K, m]``, the ended tasks' factor ``F`` (orthogonal to ``U``; ``m`` may be 0).
        floor: ``>= 0``; with ``floor = 0`` a tiny relative floor keeps the metric definite.
        count: directions wanted; at most ``K - d`` are returned.
    Returns:
        float64 ``[k, K]`` unit rows, ``k = min(count, K - d)``, orthogonal to ``U``, best first.
    """
    k_in = new_moment.shape[0]
    u = basis.to(torch.float64)
    p = torch.eye(k_in, dtype=torch.float64, device=new_moment.device) - u @ u.T
    free = torch.linalg.eigh(p).eigenvectors[:, u.shape[1]:]          # [K, f], eigenvalue 1 block
    f = residual.to(torch.float64).T @ free                            # F in free coordinates [m, f]
    metric = f.T @ f
    scale = float(torch.trace(metric)) / free.shape[1]
    floor = max(floor, 1e-6 * scale) if scale > 0 else max(floor, 1.0)
    metric = metric + floor * torch.eye(free.shape[1], dtype=torch.float64, device=metric.device)
    moment = free.T @ new_moment @ free
    chol = torch.linalg.cholesky((metric + metric.T) / 2)
    half = torch.linalg.solve_triangular(chol, moment, upper=False)                  # L^-1 C
    whitened = torch.linalg.solve_triangular(chol, half.T, upper=False)              # L^-1 C L^-T
    w = torch.linalg.eigh((whitened + whitened.T) / 2).eigenvectors.flip(1)[:, :count]
    v = torch.linalg.solve_triangular(chol.T, w, upper=True)                        # L^-T w
    rows = (free @ v).T
    return rows / rows.norm(dim=1, keepdim=True)
