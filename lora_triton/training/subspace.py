"""The protected input subspace of one layer: an orthonormal basis grown task by task.

After a task, a layer's calibration inputs ``X [n, K]`` are summarised by their Gram matrix
``G = X^T X`` (float64, accumulated batch by batch). ``extend_basis`` adds to the layer's
basis ``U [K, d]`` the fewest directions (eigenvectors of the part of ``G`` outside
``span(U)``, largest first) that make ``span(U)`` hold a fraction ``energy`` of the task's
input energy ``||X||_F^2 = trace(G)``. The bases of successive tasks are nested, so
``I - U U^T`` only ever shrinks. ``energy = 1.0`` keeps every direction with non-negligible
energy (eigenvalue above ``ZERO_ENERGY_RTOL * trace(G)``): the span of all inputs seen.
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


def _directions_to_keep(eigenvalues: torch.Tensor, needed: float, total: float, energy: float) -> int:
    """How many of the descending ``eigenvalues`` to keep so that their sum reaches ``needed``."""
    significant = int((eigenvalues > ZERO_ENERGY_RTOL * total).sum())
    if energy >= 1.0:
        return significant
    if needed <= 0:
        return 0
    reached = torch.cumsum(eigenvalues, 0) >= needed
    count = int(reached.nonzero()[0, 0]) + 1 if bool(reached.any()) else eigenvalues.numel()
    return min(count, significant)


def extend_basis(basis: torch.Tensor, gram: torch.Tensor, energy: float) -> tuple[torch.Tensor, SubspaceStats]:
    """Grow ``basis`` until it holds ``energy`` of the energy in ``gram``.

    Args:
        basis: ``[K, d]`` with orthonormal columns (any float dtype; ``d`` may be 0).
        gram: ``[K, K]`` float64, ``X^T X`` of the task's inputs at this layer.
        energy: fraction in ``[0, 1]``; ``0`` adds nothing (no protection), ``1`` keeps all.
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
    k = _directions_to_keep(eigenvalues, energy * total - already, total, energy)
    # One re-orthogonalisation pass keeps U orthonormal to float64 precision over many tasks.
    new = eigenvectors[:, :k] - u @ (u.T @ eigenvectors[:, :k])
    new = torch.linalg.qr(new).Q if k else new
    grown = torch.cat([u, new], dim=1)
    discarded = max(total - float(torch.trace(grown.T @ gram @ grown)), 0.0)
    return grown.to(basis.dtype), SubspaceStats(total, discarded, k, energy)
