"""Factor maths: damping, inverses, the relative change Diff, and triangle packing for transport.

The per-step functions (:func:`factor_statistics`, :func:`invert_all`) work on many layers at once and
return device tensors or one host read for all of them: a step's host synchronisations do not grow
with the number of layers.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

INVERSE_METHODS = ("cholesky", "eigen")


def diff_from_squares(change_sq: float, previous_sq: float) -> float:
    """Diff from ‖X − X_pre‖² and ‖X_pre‖² (0/0 = 0: a factor that stays zero has not changed)."""
    if previous_sq == 0.0:
        return 0.0 if change_sq == 0.0 else math.inf
    return math.sqrt(max(change_sq, 0.0) / previous_sq)


def split_half_noise(first: torch.Tensor, first_samples: int, second: torch.Tensor, second_samples: int
                     ) -> torch.Tensor:
    """Unbiased estimate of Var(X) = E‖X − E X‖²_F for X = (n₁X₁ + n₂X₂)/n, the mean of n independent
    per-sample terms, from the means X₁, X₂ of two disjoint parts of them (docs/NOISE.md):
    E‖X₁ − X₂‖² = σ²(1/n₁ + 1/n₂) and Var(X) = σ²/n, so Var(X) ≈ ‖X₁ − X₂‖²·n₁n₂/n². A 0-d tensor on
    the device; 0 when a part is empty (no estimate: the raw Diff is used)."""
    total = first_samples + second_samples
    if not (first_samples and second_samples):
        return torch.zeros((), dtype=first.dtype, device=first.device)
    return (first - second).square().sum() * (first_samples * second_samples / total ** 2)


def factor_statistics(factors: Sequence[Tuple[torch.Tensor, Tuple[int, ...], bool, Optional[torch.Tensor],
                                             Optional[torch.Tensor]]]) -> List[List[float]]:
    """For each (X, shape, packed, X_pre or None, noise or None), with X the full (batched) matrix or,
    when ``packed``, its upper triangles as :func:`pack` gives them (X_pre is always full): [Σ X
    (non-finite iff X holds a NaN or Inf), ‖X − X_pre‖², ‖X_pre‖², mean of X's diagonal (for π), the
    noise (0 without)], fetched in one host read.

    On triangles, ‖D‖² = 2 Σ_{i≤j} d_ij² − Σ_i d_ii²: the full matrix is never rebuilt.
    """
    if not factors:
        return []
    rows = []
    for current, shape, packed, previous, noise in factors:
        zero = torch.zeros((), dtype=current.dtype, device=current.device)
        if packed:
            diagonal = _triangle_diagonal(shape[-1], current.device)
            size = shape[-1]
            triangles = current.view(-1, size * (size + 1) // 2)
            diagonal_mean = triangles.index_select(-1, diagonal).mean()
            if previous is None:
                change_sq = zero
            else:
                change = triangles - pack(previous, True).view_as(triangles)
                change_sq = 2 * change.square().sum() - change.index_select(-1, diagonal).square().sum()
        else:
            diagonal_mean = torch.diagonal(current, dim1=-2, dim2=-1).mean()
            change_sq = zero if previous is None else (current - previous).square().sum()
        previous_sq = zero if previous is None else torch.linalg.vector_norm(previous).square()
        noise = zero if noise is None else noise.to(current.dtype)
        rows.append(torch.stack([current.sum(), change_sq, previous_sq, diagonal_mean, noise]).to(torch.float64))
    return torch.stack(rows).tolist()


def _triangle_diagonal(size: int, device: torch.device) -> torch.Tensor:
    """Positions of the diagonal entries in a packed upper triangle: row i starts at i·n − i(i−1)/2."""
    rows = torch.arange(size, device=device)
    return rows * size - rows * (rows - 1) // 2


def pi_from_diagonal_means(a_mean: float, g_mean: float) -> float:
    """π = sqrt((tr A / dim A) / (tr G / dim G)); 1 when either trace is not positive."""
    if not (a_mean > 0 and g_mean > 0) or not math.isfinite(a_mean / g_mean):
        return 1.0
    return math.sqrt(a_mean / g_mean)


def pi_correction(a_factor: torch.Tensor, g_factor: torch.Tensor) -> float:
    """π = sqrt((tr A / dim A) / (tr G / dim G)), splitting Tikhonov damping over the two factors."""
    means = torch.stack([torch.diagonal(a_factor).mean(), torch.diagonal(g_factor).mean()]).tolist()
    return pi_from_diagonal_means(*means)


def damping_shifts(kinds: Sequence[str], damping: float, pi: float) -> Dict[str, float]:
    """Diagonal shift per factor: (A + π√γ I), (G + √γ/π I) — factored Tikhonov damping (Martens &
    Grosse 2015, §6.3); BatchNorm's 2×2 blocks: F + γ I, the exact damped block."""
    if "F" in kinds:
        return {"F": damping}
    root = math.sqrt(damping)
    return {"A": pi * root, "G": root / pi}


def inverse_attempt(matrix: torch.Tensor, diagonal_shift: float, method: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(M + shift·I)⁻¹ for a symmetric positive semi-definite M (batched over leading dimensions), and a
    0-d bool tensor on the device that is True when it succeeded. Nothing is read back to the host."""
    if method == "cholesky":
        damped = matrix.clone()
        damped.diagonal(dim1=-2, dim2=-1).add_(diagonal_shift)
        lower, info = torch.linalg.cholesky_ex(damped)
        inverse = torch.cholesky_inverse(lower)
        return inverse, (info == 0).all() & torch.isfinite(inverse.sum())
    if method == "eigen":
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        # Clamping removes the small negative eigenvalues rounding leaves in a PSD factor.
        scale = 1.0 / (eigenvalues.clamp(min=0.0) + diagonal_shift)
        inverse = (eigenvectors * scale.unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)
        return inverse, torch.isfinite(inverse.sum())
    raise ValueError(f"inverse_method must be one of {INVERSE_METHODS}, got {method!r}")


def symmetric_inverse(matrix: torch.Tensor, diagonal_shift: float, method: str) -> torch.Tensor:
    """(M + shift·I)⁻¹; raises torch.linalg.LinAlgError when the attempt fails."""
    inverse, ok = inverse_attempt(matrix, diagonal_shift, method)
    if not bool(ok):
        raise torch.linalg.LinAlgError(f"{method} inversion failed")
    return inverse


def damped_inverses(factors: Dict[str, torch.Tensor], damping: float, *, pi_damping: bool,
                    method: str) -> Dict[str, torch.Tensor]:
    """Inverses of one layer's damped factors (see :func:`damping_shifts`)."""
    pi = pi_correction(factors["A"], factors["G"]) if pi_damping and "A" in factors else 1.0
    shifts = damping_shifts(list(factors), damping, pi)
    return {kind: symmetric_inverse(factor, shifts[kind], method) for kind, factor in factors.items()}


def robust_damped_inverses(factors: Dict[str, torch.Tensor], damping: float, *, pi: float, method: str,
                           retries: int = 3) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """The fallback when a layer's first inversion failed; returns (inverses or None, what happened).

    Retries with damping ×10 up to ``retries`` times, then by eigendecomposition with clamped
    eigenvalues at the original damping; (None, "inversion failed") when all of that fails, which tells
    the caller to keep the inverse it already holds. Each attempt reads one flag back from the device:
    this path runs only for layers whose inversion failed.
    """
    attempts = [(damping * 10 ** i, method) for i in range(1, retries + 1)]
    if method != "eigen":
        attempts.append((damping, "eigen"))
    for attempt_damping, attempt_method in attempts:
        shifts = damping_shifts(list(factors), attempt_damping, pi)
        try:
            results = {kind: inverse_attempt(factor, shifts[kind], attempt_method) for kind, factor in factors.items()}
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
        if bool(torch.stack([ok for _, ok in results.values()]).all()):
            return ({kind: inverse for kind, (inverse, _) in results.items()},
                    f"inverted with {attempt_method}, damping {attempt_damping:g}")
    return None, "inversion failed"


def invert_all(jobs: Dict[str, Dict[str, torch.Tensor]], shifts: Dict[str, Dict[str, float]],
               method: str) -> Tuple[Dict[str, Dict[str, torch.Tensor]], List[str]]:
    """First attempt at inverting every (layer → {kind: factor}) in ``jobs`` with its ``shifts``; one
    host read for all of them. Returns the inverses of the layers that succeeded and the names of the
    layers that failed (for :func:`robust_damped_inverses`)."""
    attempts: Dict[str, Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = {}
    failed: List[str] = []
    for name, factors in jobs.items():
        try:
            attempts[name] = {kind: inverse_attempt(factor, shifts[name][kind], method)
                              for kind, factor in factors.items()}
        except (RuntimeError, torch.linalg.LinAlgError):  # eigh can raise where cholesky_ex reports
            failed.append(name)
    if not attempts:
        return {}, failed
    flags = torch.stack([torch.stack([ok for _, ok in kinds.values()]).all() for kinds in attempts.values()])
    inverses = {}
    for (name, kinds), ok in zip(attempts.items(), flags.tolist()):
        if ok:
            inverses[name] = {kind: inverse for kind, (inverse, _) in kinds.items()}
        else:
            failed.append(name)
    return inverses, failed


# Triangle packing ---------------------------------------------------------------------------------
class TriangleIndices:
    """Flat row-major positions of the upper triangle of an n×n matrix, as int32.

    On the CPU, building them for a 4608-wide factor costs more than packing it, so they are kept per
    size; the least recently used sizes are dropped once the kept indices exceed ``budget_bytes``. On a
    GPU they are built in microseconds and nothing is kept: K-FAC's persistent GPU memory is its
    factors and inverses alone.
    """

    def __init__(self, budget_bytes: int = 128 * 2 ** 20) -> None:
        self.budget_bytes = budget_bytes
        self._kept: "OrderedDict[Tuple[int, str], torch.Tensor]" = OrderedDict()

    def get(self, size: int, device: torch.device) -> torch.Tensor:
        key = (size, str(device))
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        rows, cols = torch.triu_indices(size, size, device=device).unbind(0)
        upper = (rows * size + cols).to(torch.int32)
        if torch.device(device).type != "cpu":
            return upper
        self._kept[key] = upper
        while self.nbytes() > self.budget_bytes and len(self._kept) > 1:
            self._kept.popitem(last=False)
        return upper

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._kept.values())

    def clear(self) -> None:
        self._kept.clear()


TRIANGLES = TriangleIndices()
_UNPACK_CHUNK = 1 << 22   # index entries widened to int64 at a time when unpacking


def pack(matrix: torch.Tensor, symmetric: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The tensor handed to Horovod: upper triangle(s) of a symmetric (batched) matrix, or all of it;
    written into ``out`` (1-D, contiguous, ``packed_numel`` long) when given."""
    if not symmetric:
        flat = matrix.contiguous().reshape(-1)
        return flat if out is None else out.copy_(flat)
    size = matrix.shape[-1]
    upper = TRIANGLES.get(size, matrix.device)
    rows = matrix.reshape(-1, size * size)
    if out is None:
        return rows.index_select(-1, upper).reshape(-1)
    torch.index_select(rows, -1, upper, out=out.view(rows.shape[0], upper.numel()))
    return out


def unpack(flat: torch.Tensor, shape: Tuple[int, ...], symmetric: bool,
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse of :func:`pack`, exact (the lower triangle is a copy of the upper one); into ``out`` (of
    ``shape``, contiguous) when given. The upper triangle is scattered, then mirrored with one
    transposed copy: no second set of indices."""
    if not symmetric:
        return flat.reshape(shape) if out is None else out.copy_(flat.reshape(shape))
    size = shape[-1]
    upper = TRIANGLES.get(size, flat.device)
    values = flat.reshape(-1, upper.numel())
    target = flat.new_empty(shape) if out is None else out
    matrix = target.view(-1, size * size)
    for start in range(0, upper.numel(), _UNPACK_CHUNK):
        matrix.index_copy_(-1, upper[start:start + _UNPACK_CHUNK].long(), values[:, start:start + _UNPACK_CHUNK])
    square = target.view(-1, size, size)
    square.triu_()
    square.add_(square.mT.tril(-1))
    return target


def packed_numel(shape: Tuple[int, ...], symmetric: bool) -> int:
    batch = math.prod(shape[:-2])
    size = shape[-1]
    return batch * (size * (size + 1) // 2 if symmetric else size * size)


def kl_clip_scale(preconditioned: Dict[str, torch.Tensor], gradients: Dict[str, torch.Tensor],
                  kl_clip: float, lr: float) -> torch.Tensor:
    """ν = min(1, sqrt(kl_clip / (lr² Σ ⟨v, g⟩))) from Ba et al. 2017, bounding the update's KL.

    A 0-d tensor on the gradients' device: computing it takes no host synchronisation. A sum that is
    not positive (or not finite) gives ν = 1.
    """
    inner = torch.stack([(preconditioned[name] * gradients[name]).sum() for name in preconditioned]).sum()
    inner = inner * lr ** 2
    scale = torch.sqrt(kl_clip / inner).clamp(max=1.0)
    return torch.where((inner > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
