#!/usr/bin/env python
"""The inversion phase of one K-FAC update step: batched by size against one call per factor.

torchvision's ResNet-50 (random initialisation, ``zero_init_residual``: without it the output gradients
of the deep layers reach 1e17 at initialisation and most first Cholesky attempts fail, so the fallback
would be measured), one process, so this rank inverts every layer. One forward/backward pass and
``kfac.step()`` give real factors; then the inversion phase
(``KFAC._invert`` on every layer, what ``step`` runs between the schedule and the inverse allgather)
runs ``--repeats`` times with ``batched_inversion`` True and False in turn, and the ratio of the
medians is reported. The size of a factor does not depend on the image size, so 32 px is enough.

Also counted per mode: the calls of ``torch.linalg.cholesky_ex`` and ``torch.cholesky_inverse`` and the
largest stacked input of one Cholesky call (the batch's transient memory is twice that: the damped
stack and its Cholesky factor, then that factor and the inverse). And the triangle packing and
unpacking of the inverse allgather for every layer that is not inverted everywhere: per layer (what
``kfac.step`` does) against stacking the equal sizes first.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.inversion            # this CPU: 5-15 min
    python3 -m bench.inversion --device cuda --threads 0              # a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torchvision
from torch import nn

import kfac_hvd
from kfac_hvd.factors import pack, packed_numel, unpack


@contextlib.contextmanager
def counted_linalg(counts: dict[str, int]) -> Iterator[None]:
    """Counts the Cholesky calls and records the largest stacked input of one."""
    cholesky, inverse = torch.linalg.cholesky_ex, torch.cholesky_inverse

    def counting_cholesky(matrix, *args, **kwargs):
        counts["cholesky_ex"] += 1
        counts["largest_input_bytes"] = max(
            counts["largest_input_bytes"], matrix.numel() * matrix.element_size()
        )
        return cholesky(matrix, *args, **kwargs)

    def counting_inverse(matrix, *args, **kwargs):
        counts["cholesky_inverse"] += 1
        return inverse(matrix, *args, **kwargs)

    torch.linalg.cholesky_ex, torch.cholesky_inverse = counting_cholesky, counting_inverse
    try:
        yield
    finally:
        torch.linalg.cholesky_ex, torch.cholesky_inverse = cholesky, inverse


def seconds(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(
    runs: dict[str, Callable[[], object]], repeats: int, device: torch.device, *, warm: bool = False
) -> dict[str, list[float]]:
    """Each run once per round, in turn (the order reversed every other round), so that all see the
    same machine load; after one untimed round unless ``warm``."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in [] if warm else runs.values():
        run()
    for round_index in range(repeats):
        order = list(runs.items())
        for name, run in order if round_index % 2 == 0 else order[::-1]:
            times[name].append(seconds(run, device))
    return times


def transport_runs(inverses: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """Packing the sent and unpacking the received triangles of ``inverses``."""
    flats = [pack(inverse, True) for inverse in inverses]
    send = torch.empty(sum(flat.numel() for flat in flats), dtype=flats[0].dtype, device=flats[0].device)
    held = [torch.empty(inverse.shape, dtype=inverse.dtype, device=inverse.device) for inverse in inverses]
    by_size: dict[int, list[int]] = {}
    for index, inverse in enumerate(inverses):
        by_size.setdefault(inverse.shape[-1], []).append(index)

    def pack_each():
        torch.cat([pack(inverse, True) for inverse in inverses], out=send)

    def pack_by_size():
        offset = 0
        for size, members in by_size.items():
            count = len(members) * packed_numel((size, size), True)
            pack(torch.stack([inverses[i] for i in members]), True, out=send[offset : offset + count])
            offset += count

    def unpack_each():
        for flat, out in zip(flats, held):
            unpack(flat, tuple(out.shape), True, out=out)

    def unpack_by_size():
        for size, members in by_size.items():
            square = unpack(torch.cat([flats[i] for i in members]), (len(members), size, size), True)
            for row, i in zip(square, members):
                held[i].copy_(row)

    return {
        "pack_each": pack_each,
        "pack_by_size": pack_by_size,
        "unpack_each": unpack_each,
        "unpack_by_size": unpack_by_size,
    }


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--damping", type=float, default=1e-3)
    p.add_argument("--inverse-method", choices=("cholesky", "eigen"), default="cholesky")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's choice)")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, zero_init_residual=True).to(device)
    kfac = kfac_hvd.KFAC(model, damping=args.damping, inverse_method=args.inverse_method)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    nn.functional.cross_entropy(model(x), y).backward()
    kfac.step()
    due = {name: list(layer.factor_kinds) for name, layer in kfac.layers.items()}
    sizes = {factor.shape[-1] for kinds in kfac.factors.values() for factor in kinds.values()}

    def inversion(batched: bool) -> Callable[[], object]:
        def run():
            kfac.options = dataclasses.replace(kfac.options, batched_inversion=batched)
            numerics: dict[str, str] = {}
            kfac._invert(due, numerics)
            if numerics:
                raise RuntimeError(f"an inversion failed: {numerics}")

        return run

    counts = {}
    for mode, batched in (("batched", True), ("per_layer", False)):  # also the untimed round
        counts[mode] = {"cholesky_ex": 0, "cholesky_inverse": 0, "largest_input_bytes": 0}
        with counted_linalg(counts[mode]):
            inversion(batched)()
    times = alternate(
        {"batched": inversion(True), "per_layer": inversion(False)}, args.repeats, device, warm=True
    )
    print(json.dumps({"calls": counts, "inversion_s": times}), flush=True)
    travelling = [
        inverse
        for name in kfac.layers
        if name not in kfac.local_layers
        for inverse in kfac.inverses[name].values()
    ]
    times.update(alternate(transport_runs(travelling), args.repeats, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "setting": {
            **vars(args),
            "torch_threads": torch.get_num_threads(),
            "layers": len(kfac.layers),
            "factors": sum(len(kinds) for kinds in kfac.factors.values()),
            "distinct_sizes": len(sizes),
        },
        "calls": counts,
        "median_s": median,
        "seconds": times,
        "ratios": {
            "inversion_per_layer_over_batched": median["per_layer"] / median["batched"],
            "pack_each_over_by_size": median["pack_each"] / median["pack_by_size"],
            "unpack_each_over_by_size": median["unpack_each"] / median["unpack_by_size"],
        },
    }
    print(json.dumps({key: result[key] for key in ("setting", "calls", "median_s", "ratios")}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
