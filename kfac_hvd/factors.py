"""Factor maths: damping, inverses, the relative change Diff, and triangle packing for transport."""
from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Tuple

import torch

INVERSE_METHODS = ("cholesky", "eigen")


def relative_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Diff(X, X_pre) = ‖X − X_pre‖_F / ‖X_pre‖_F (eq. 6). For BN's stacked 2×2 blocks, of the stack."""
    denominator = torch.linalg.vector_norm(previous).item()
    numerator = torch.linalg.vector_norm(current - previous).item()
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def all_finite(*tensors: torch.Tensor) -> bool:
    """No NaN or Inf anywhere. One reduction per tensor: a NaN or Inf makes its sum non-finite (a sum that
    overflows to Inf also counts as non-finite, which is as unusable for K-FAC)."""
    return all(math.isfinite(tensor.sum().item()) for tensor in tensors)


def pi_correction(a_factor: torch.Tensor, g_factor: torch.Tensor) -> float:
    """π = sqrt((tr A / dim A) / (tr G / dim G)), splitting Tikhonov damping over the two factors."""
    a_mean = torch.diagonal(a_factor).mean().item()
    g_mean = torch.diagonal(g_factor).mean().item()
    if not (a_mean > 0 and g_mean > 0) or not math.isfinite(a_mean / g_mean):
        return 1.0
    return math.sqrt(a_mean / g_mean)


def symmetric_inverse(matrix: torch.Tensor, diagonal_shift: float, method: str) -> torch.Tensor:
    """(M + shift·I)⁻¹ for a symmetric positive semi-definite M (batched over leading dimensions)."""
    if method == "cholesky":
        damped = matrix.clone()
        damped.diagonal(dim1=-2, dim2=-1).add_(diagonal_shift)
        return torch.cholesky_inverse(torch.linalg.cholesky(damped))
    if method == "eigen":
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        # Clamping removes the small negative eigenvalues rounding leaves in a PSD factor.
        scale = 1.0 / (eigenvalues.clamp(min=0.0) + diagonal_shift)
        return (eigenvectors * scale.unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)
    raise ValueError(f"inverse_method must be one of {INVERSE_METHODS}, got {method!r}")


def damped_inverses(factors: Dict[str, torch.Tensor], damping: float, *, pi_damping: bool,
                    method: str) -> Dict[str, torch.Tensor]:
    """Inverses of one layer's damped factors.

    Kronecker layers: (A + π√γ I)⁻¹ and (G + √γ/π I)⁻¹, factored Tikhonov damping (Martens & Grosse
    2015, §6.3). BatchNorm's per-channel 2×2 blocks: (F_c + γ I)⁻¹, the exact damped block.
    """
    if "F" in factors:
        return {"F": symmetric_inverse(factors["F"], damping, method)}
    pi = pi_correction(factors["A"], factors["G"]) if pi_damping else 1.0
    root = math.sqrt(damping)
    return {"A": symmetric_inverse(factors["A"], pi * root, method),
            "G": symmetric_inverse(factors["G"], root / pi, method)}


def robust_damped_inverses(factors: Dict[str, torch.Tensor], damping: float, *, pi_damping: bool, method: str,
                           retries: int = 3) -> Tuple[Optional[Dict[str, torch.Tensor]], Optional[str]]:
    """:func:`damped_inverses` that survives bad factors; returns (inverses or None, what happened).

    Non-finite factors give (None, "non-finite factor"). A failed or non-finite inverse is retried with
    damping ×10 up to ``retries`` times, then by eigendecomposition with clamped eigenvalues at the
    original damping; (None, "inversion failed") when all of that fails. ``None`` tells the caller to
    keep the inverse it already holds.
    """
    if not all_finite(*factors.values()):
        return None, "non-finite factor"
    attempts = [(damping * 10 ** i, method) for i in range(retries + 1)]
    if method != "eigen":
        attempts.append((damping, "eigen"))
    for number, (attempt_damping, attempt_method) in enumerate(attempts):
        try:
            inverses = damped_inverses(factors, attempt_damping, pi_damping=pi_damping, method=attempt_method)
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
        if all_finite(*inverses.values()):
            event = None if number == 0 else f"inverted with {attempt_method}, damping {attempt_damping:g}"
            return inverses, event
    return None, "inversion failed"


@functools.lru_cache(maxsize=None)
def triangle_flat_indices(size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of the upper triangle (row-major) and of its mirror; cached, since building them
    for a 4608-wide factor costs more than packing it."""
    rows, cols = torch.triu_indices(size, size, device=device).unbind(0)
    return rows * size + cols, cols * size + rows


def pack(matrix: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """The tensor handed to Horovod: upper triangle(s) of a symmetric (batched) matrix, or all of it."""
    if not symmetric:
        return matrix.contiguous().reshape(-1)
    size = matrix.shape[-1]
    upper, _ = triangle_flat_indices(size, matrix.device)
    return matrix.reshape(*matrix.shape[:-2], size * size).index_select(-1, upper).reshape(-1)


def unpack(flat: torch.Tensor, shape: Tuple[int, ...], symmetric: bool) -> torch.Tensor:
    """Inverse of :func:`pack`; exact (the lower triangle is a copy of the upper one)."""
    if not symmetric:
        return flat.reshape(shape)
    size = shape[-1]
    upper, mirror = triangle_flat_indices(size, flat.device)
    values = flat.reshape(*shape[:-2], upper.numel())
    out = flat.new_empty(*shape[:-2], size * size)
    out.index_copy_(-1, mirror, values)
    out.index_copy_(-1, upper, values)
    return out.reshape(shape)


def packed_numel(shape: Tuple[int, ...], symmetric: bool) -> int:
    batch = math.prod(shape[:-2])
    size = shape[-1]
    return batch * (size * (size + 1) // 2 if symmetric else size * size)


def kl_clip_scale(preconditioned: Dict[str, torch.Tensor], gradients: Dict[str, torch.Tensor],
                  kl_clip: float, lr: Optional[float]) -> torch.Tensor:
    """ν = min(1, sqrt(kl_clip / (lr² Σ ⟨v, g⟩))) from Ba et al. 2017, bounding the update's KL.

    A 0-d tensor on the gradients' device: computing it takes no host synchronisation. A sum that is
    not positive (or not finite) gives ν = 1.
    """
    if lr is None:
        raise ValueError("kfac.step(lr=...) is required when kl_clip is set")
    inner = torch.stack([(preconditioned[name] * gradients[name]).sum() for name in preconditioned]).sum()
    inner = inner * lr ** 2
    scale = torch.sqrt(kl_clip / inner).clamp(max=1.0)
    return torch.where((inner > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
