"""Factor maths: damping, inverses, the relative change Diff, and triangle packing for transport.

The per-step functions (:func:`factor_statistics`, :func:`invert_all`) work on many layers at once and
return device tensors or one host read for all of them: a step's host synchronisations do not grow
with the number of layers.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch

INVERSE_METHODS = ("cholesky", "eigen")
BATCH_BYTES = 256 * 2**20  # cap on one stacked batch of factors (ResNet-50's three 4608-wide A's: 243 MiB)
Key = tuple[str, str]  # (layer, kind)


def diff_from_squares(change_sq: float, previous_sq: float) -> float:
    """Diff from ‖X − X_pre‖² and ‖X_pre‖² (0/0 = 0: a factor that stays zero has not changed)."""
    if previous_sq == 0.0:
        return 0.0 if change_sq == 0.0 else math.inf
    return math.sqrt(max(change_sq, 0.0) / previous_sq)


def split_half_noise(
    first: torch.Tensor, first_samples: int, second: torch.Tensor, second_samples: int
) -> torch.Tensor:
    """Unbiased estimate of Var(X) = E‖X − E X‖²_F for X = (n₁X₁ + n₂X₂)/n, the mean of n independent
    per-sample terms, from the means X₁, X₂ of two disjoint parts of them (docs/NOISE.md):
    E‖X₁ − X₂‖² = σ²(1/n₁ + 1/n₂) and Var(X) = σ²/n, so Var(X) ≈ ‖X₁ − X₂‖²·n₁n₂/n². A 0-d tensor on
    the device; 0 when a part is empty (no estimate: the raw Diff is used)."""
    total = first_samples + second_samples
    if not (first_samples and second_samples):
        return torch.zeros((), dtype=first.dtype, device=first.device)
    return (first - second).square().sum() * (first_samples * second_samples / total**2)


class FactorStatistics(NamedTuple):
    """What Algorithm 1 and π need of one averaged factor X, read to the host with every other's."""

    total: float  # Σ X: non-finite iff X holds a NaN or an Inf
    change_sq: float  # ‖X − X_pre‖² (0 without X_pre)
    previous_sq: float  # ‖X_pre‖² (0 without X_pre)
    diagonal_mean: float  # mean of X's diagonal, for π
    noise: float  # the estimate of X's sampling noise E‖X − E X‖² that came with X (0 without)


def factor_statistics(
    factors: Sequence[tuple[torch.Tensor, tuple[int, ...], bool, torch.Tensor | None, torch.Tensor | None]],
) -> list[FactorStatistics]:
    """For each (X, shape, packed, X_pre or None, noise or None), with X the full (batched) matrix or,
    when ``packed``, its upper triangles as :func:`pack` gives them (X_pre is always full), its
    :class:`FactorStatistics`, fetched in one host read.

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
        rows.append(
            torch.stack([current.sum(), change_sq, previous_sq, diagonal_mean, noise]).to(torch.float64)
        )
    return [FactorStatistics(*row) for row in torch.stack(rows).tolist()]


def _triangle_diagonal(size: int, device: torch.device) -> torch.Tensor:
    """Positions of the diagonal entries in a packed upper triangle: row i starts at i·n − i(i−1)/2."""
    rows = torch.arange(size, device=device)
    return rows * size - rows * (rows - 1) // 2


def pi_from_diagonal_means(a_mean: float, g_mean: float) -> float:
    """π = sqrt((tr A / dim A) / (tr G / dim G)); 1 when either trace is not positive."""
    if not (a_mean > 0 and g_mean > 0) or not math.isfinite(a_mean / g_mean):
        return 1.0
    return math.sqrt(a_mean / g_mean)


def damping_shifts(kinds: Sequence[str], damping: float, pi: float) -> dict[str, float]:
    """Diagonal shift per factor: (A + π√γ I), (G + √γ/π I) — factored Tikhonov damping (Martens &
    Grosse 2015, §6.3); BatchNorm's blocks (2×2 per channel, or the full 2C×2C block): F + γ I, the
    exact damped block, no π (there is no Kronecker pair to balance).

    The paper's released code (chainerkfac, ``FisherBlockBatchNormalization.get_diagvals``) damps its
    2C×2C BatchNorm block the same way but with a larger shift: stab_coeff · max(l2_coef, γ) on every
    diagonal entry (γ's and β's alike; l2_coef is a parameter's weight decay, set on no parameter of its
    ResNet-50, so stab_coeff · γ), then a Cholesky inverse. stab_coeff is the optimiser's default 16 in
    its ImageNet runs (the configs' "stab_coeff": 64 is never passed to the optimiser by its train.py),
    i.e. a BatchNorm shift of 16 × 2.5e-4 = 4e-3. Here the shift is γ for both block shapes."""
    if "F" in kinds:
        return {"F": damping}
    root = math.sqrt(damping)
    return {"A": pi * root, "G": root / pi}


def inverse_attempt(
    matrix: torch.Tensor, diagonal_shift: float, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M + shift·I)⁻¹ for a symmetric positive semi-definite M (batched over leading dimensions), and a
    0-d bool tensor on the device that is True when it succeeded. Nothing is read back to the host."""
    if method == "cholesky":
        damped = matrix.clone()
        damped.diagonal(dim1=-2, dim2=-1).add_(diagonal_shift)
        lower, info = torch.linalg.cholesky_ex(damped)
        inverse = torch.cholesky_inverse(lower)
        return inverse, (info == 0).all() & torch.isfinite(inverse.sum())
    if method == "eigen":
        inverse, ok = _eigen_inverse(matrix, float(diagonal_shift))
        return inverse, ok.all()
    raise ValueError(f"inverse_method must be one of {INVERSE_METHODS}, got {method!r}")


def robust_damped_inverses(
    factors: dict[str, torch.Tensor], damping: float, *, pi: float, method: str, retries: int = 3
) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The fallback when a layer's first inversion failed; returns (inverses or None, what happened).

    Retries with damping ×10 up to ``retries`` times, then by eigendecomposition with clamped
    eigenvalues at the original damping; (None, "inversion failed") when all of that fails, which tells
    the caller to keep the inverse it already holds. Each attempt reads one flag back from the device:
    this path runs only for layers whose inversion failed.
    """
    attempts = [(damping * 10**i, method) for i in range(1, retries + 1)]
    if method != "eigen":
        attempts.append((damping, "eigen"))
    for attempt_damping, attempt_method in attempts:
        shifts = damping_shifts(list(factors), attempt_damping, pi)
        try:
            results = {
                kind: inverse_attempt(factor, shifts[kind], attempt_method)
                for kind, factor in factors.items()
            }
        except (RuntimeError, torch.linalg.LinAlgError):
            continue
        if bool(torch.stack([ok for _, ok in results.values()]).all()):
            return (
                {kind: inverse for kind, (inverse, _) in results.items()},
                f"inverted with {attempt_method}, damping {attempt_damping:g}",
            )
    return None, "inversion failed"


def invert_all(
    jobs: dict[str, dict[str, torch.Tensor]],
    shifts: dict[str, dict[str, float]],
    method: str,
    *,
    batched: bool = True,
    batch_bytes: int = BATCH_BYTES,
) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """First attempt at inverting every (layer → {kind: factor}) in ``jobs`` with its ``shifts``; one
    host read for all of them. Returns the inverses of the layers that succeeded and the names of the
    layers that failed (for :func:`robust_damped_inverses`), in the order of ``jobs``.

    ``batched``: factors of equal size, dtype and device are inverted in one call per group of at most
    ``batch_bytes`` stacked bytes (a larger factor alone), and every 2×2 block (BatchNorm) of the
    Cholesky method in one closed-form pass; a layer's result does not depend on its batch. Otherwise
    one call per factor.
    """
    if batched:
        attempts = _batched_attempts(jobs, shifts, method, batch_bytes)
    else:
        attempts = _single_attempts(jobs, shifts, method)
    failed = {name for name, _ in attempts.raised}
    if attempts.groups:
        flags = [group.flags() for group in attempts.groups]
        values = iter(torch.cat([flag.to(flags[0].device) for flag in flags]).tolist())
        for group, flag in zip(attempts.groups, flags):
            failed.update(name for name, _ in group.failed_keys([next(values) for _ in range(flag.numel())]))
    inverses: dict[str, dict[str, torch.Tensor]] = {}
    for group in attempts.groups:
        for (name, kind), inverse in group.results():
            if name not in failed:
                inverses.setdefault(name, {})[kind] = inverse
    return inverses, [name for name in jobs if name in failed]


class _Group:
    """Inverses of some factors of one size from one call.

    ``members`` are (key, rows, factor shape): each member owns ``rows`` consecutive rows of
    ``block_ok`` (one flag per stacked block) and, in a group of several, of ``inverse``.
    """

    def __init__(
        self, members: list[tuple[Key, int, torch.Size]], inverse: torch.Tensor, block_ok: torch.Tensor
    ) -> None:
        self.members, self.inverse, self.block_ok = members, inverse, block_ok

    def flags(self) -> torch.Tensor:
        """What the one host read fetches: a flag per member, or one for the group when members span
        several blocks (BatchNorm's channels)."""
        if len(self.members) == len(self.block_ok):
            return self.block_ok
        return self.block_ok.all().reshape(1)

    def failed_keys(self, flags: list[bool]) -> list[Key]:
        if len(flags) == len(self.members):
            return [key for (key, _, _), ok in zip(self.members, flags) if not ok]
        if flags[0]:
            return []
        # Some block failed: find its members. A second read, only on a step where an inversion failed.
        pieces = self.block_ok.split([blocks for _, blocks, _ in self.members])
        return self.failed_keys(torch.stack([piece.all() for piece in pieces]).tolist())

    def results(self) -> list[tuple[Key, torch.Tensor]]:
        if len(self.members) == 1:
            key, _, shape = self.members[0]
            return [(key, self.inverse.reshape(shape))]
        # Each inverse gets its own storage: a layer refreshed later must free its slot.
        pieces = self.inverse.split([blocks for _, blocks, _ in self.members])
        return [(key, piece.reshape(shape).clone()) for (key, _, shape), piece in zip(self.members, pieces)]


class _Attempts:
    def __init__(self) -> None:
        self.groups: list[_Group] = []
        self.raised: list[Key] = []


def _single_attempts(
    jobs: dict[str, dict[str, torch.Tensor]], shifts: dict[str, dict[str, float]], method: str
) -> _Attempts:
    """One :func:`inverse_attempt` per factor (``batched_inversion=False``)."""
    attempts = _Attempts()
    for name, factors in jobs.items():
        for kind, factor in factors.items():
            _attempt_one(attempts, (name, kind), factor, shifts[name][kind], method)
    return attempts


def _attempt_one(attempts: _Attempts, key: Key, factor: torch.Tensor, shift: float, method: str) -> None:
    try:
        inverse, ok = inverse_attempt(factor, shift, method)
    except (RuntimeError, torch.linalg.LinAlgError):  # eigh can raise where cholesky_ex reports
        attempts.raised.append(key)
        return
    attempts.groups.append(_Group([(key, 1, factor.shape)], inverse, ok.reshape(1)))


def _batched_attempts(
    jobs: dict[str, dict[str, torch.Tensor]],
    shifts: dict[str, dict[str, float]],
    method: str,
    batch_bytes: int,
) -> _Attempts:
    by_size: dict[tuple[int, torch.dtype, torch.device], list[tuple[Key, torch.Tensor, float]]] = {}
    for name, factors in jobs.items():
        for kind, factor in factors.items():
            by_size.setdefault((factor.shape[-1], factor.dtype, factor.device), []).append(
                ((name, kind), factor, shifts[name][kind])
            )
    attempts = _Attempts()
    for (size, _, _), entries in by_size.items():
        closed_form = size == 2 and method == "cholesky"
        for batch in _split_by_bytes(entries, batch_bytes) if not closed_form else [entries]:
            try:
                attempts.groups.append(_invert_batch(batch, method, closed_form))
            except (RuntimeError, torch.linalg.LinAlgError):
                # eigh reports no failing member: try each alone.
                for key, factor, shift in batch:
                    _attempt_one(attempts, key, factor, shift, method)
    return attempts


def _split_by_bytes(
    entries: list[tuple[Key, torch.Tensor, float]], batch_bytes: int
) -> list[list[tuple[Key, torch.Tensor, float]]]:
    batches: list[list[tuple[Key, torch.Tensor, float]]] = []
    held = 0
    for entry in entries:
        nbytes = entry[1].numel() * entry[1].element_size()
        if not batches or held + nbytes > batch_bytes:
            batches.append([])
            held = 0
        batches[-1].append(entry)
        held += nbytes
    return batches


def _invert_batch(batch: list[tuple[Key, torch.Tensor, float]], method: str, closed_form: bool) -> _Group:
    """One call for all of ``batch`` (factors of one size): (M_i + shift_i·I)⁻¹ for each stacked block."""
    size = batch[0][1].shape[-1]
    blocks = [factor.reshape(-1, size, size) for _, factor, _ in batch]
    members = [(key, block.shape[0], factor.shape) for (key, factor, _), block in zip(batch, blocks)]
    shift = _block_shifts(batch, blocks)
    if closed_form:
        inverse, ok = _inverse_2x2(torch.cat(blocks), shift)
    elif method == "cholesky":
        damped = torch.cat(blocks)  # the stack is the damped copy the single call makes too
        damped.diagonal(dim1=-2, dim2=-1).add_(shift if isinstance(shift, float) else shift.unsqueeze(-1))
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        inverse = torch.cholesky_inverse(lower)
        ok = (info == 0) & torch.isfinite(inverse.sum(dim=(-2, -1)))
    else:
        inverse, ok = _eigen_inverse(blocks[0] if len(blocks) == 1 else torch.cat(blocks), shift)
    return _Group(members, inverse, ok)


def _block_shifts(batch: list[tuple[Key, torch.Tensor, float]], blocks: list[torch.Tensor]):
    """The diagonal shift of each stacked block: a float when they are all equal (BatchNorm's γ), else
    a tensor on the factors' device, copied without waiting for the device."""
    values = [shift for _, _, shift in batch]
    if all(value == values[0] for value in values):
        return float(values[0])
    counts = torch.tensor([block.shape[0] for block in blocks])
    host = torch.tensor(values, dtype=blocks[0].dtype).repeat_interleave(counts)
    device = blocks[0].device
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _inverse_2x2(blocks: torch.Tensor, shift) -> tuple[torch.Tensor, torch.Tensor]:
    """(F + shift·I)⁻¹ of symmetric 2×2 blocks by the closed form [[d, −b], [−b, a]] / (ad − b²), and a
    flag per block: True when the damped block is positive definite (a > 0 and ad − b² > 0, what
    Cholesky needs) and the inverse finite. b is read from the lower triangle, as Cholesky reads it."""
    a = blocks[:, 0, 0] + shift
    d = blocks[:, 1, 1] + shift
    b = blocks[:, 1, 0]
    determinant = a * d - b * b
    inverse = torch.stack([d, -b, -b, a], dim=-1).div_(determinant.unsqueeze(-1)).view(-1, 2, 2)
    ok = (a > 0) & (determinant > 0) & torch.isfinite(inverse).flatten(1).all(dim=1)
    return inverse, ok


def _eigen_inverse(matrix: torch.Tensor, shift) -> tuple[torch.Tensor, torch.Tensor]:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    # Clamping removes the small negative eigenvalues rounding leaves in a PSD factor.
    shift = shift if isinstance(shift, float) else shift.unsqueeze(-1)
    scale = 1.0 / (eigenvalues.clamp(min=0.0) + shift)
    inverse = (eigenvectors * scale.unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)
    return inverse, torch.isfinite(inverse.sum(dim=(-2, -1)))


# Triangle packing ---------------------------------------------------------------------------------
class TriangleIndices:
    """Flat row-major positions of the upper triangle of an n×n matrix, as int32.

    On the CPU, building them for a 4608-wide factor costs more than packing it, so they are kept per
    size; the least recently used sizes are dropped once the kept indices exceed ``budget_bytes``. On a
    GPU they are built in microseconds and nothing is kept: K-FAC's persistent GPU memory is its
    factors and inverses alone.
    """

    def __init__(self, budget_bytes: int = 128 * 2**20) -> None:
        self.budget_bytes = budget_bytes
        self._kept: OrderedDict[tuple[int, str], torch.Tensor] = OrderedDict()

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


TRIANGLES = TriangleIndices()
_UNPACK_CHUNK = 1 << 22  # index entries widened to int64 at a time when unpacking


def pack(matrix: torch.Tensor, symmetric: bool, out: torch.Tensor | None = None) -> torch.Tensor:
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


def unpack(
    flat: torch.Tensor, shape: tuple[int, ...], symmetric: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
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
        matrix.index_copy_(
            -1, upper[start : start + _UNPACK_CHUNK].long(), values[:, start : start + _UNPACK_CHUNK]
        )
    square = target.view(-1, size, size)
    square.triu_()
    square.add_(square.mT.tril(-1))
    return target


def packed_numel(shape: tuple[int, ...], symmetric: bool) -> int:
    batch = math.prod(shape[:-2])
    size = shape[-1]
    return batch * (size * (size + 1) // 2 if symmetric else size * size)


def kl_clip_scale(
    preconditioned: dict[str, torch.Tensor], gradients: dict[str, torch.Tensor], kl_clip: float, lr: float
) -> torch.Tensor:
    """ν = min(1, sqrt(kl_clip / (lr² Σ ⟨v, g⟩))) from Ba et al. 2017, bounding the update's KL.

    A 0-d tensor on the gradients' device: computing it takes no host synchronisation. A sum that is
    not positive (or not finite) gives ν = 1.
    """
    inner = torch.stack([(preconditioned[name] * gradients[name]).sum() for name in preconditioned]).sum()
    inner = inner * lr**2
    scale = torch.sqrt(kl_clip / inner).clamp(max=1.0)
    return torch.where((inner > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
