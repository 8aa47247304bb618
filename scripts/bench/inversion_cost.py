#!/usr/bin/env python
"""The inversion phase alone: every factor of a model inverted batched by size against one call per factor.

Factors of the model's shapes (kfac_hvd.timemodel.profile_model), symmetric positive definite
(I + (S + Sᵀ)/2n, S uniform in [0, 1): a Cholesky's cost does not depend on the values), damped and
inverted by ``kfac_hvd.factors.invert_all(..., batched=True/False)``, the two alternating for --repeats
rounds in one process. CPU seconds of the process and wall seconds; the medians and their ratio.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/inversion_cost.py [--model resnet50] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict

import torch


def factors_of(model_name: str, device: torch.device) -> Dict[str, Dict[str, torch.Tensor]]:
    import torchvision
    from kfac_hvd.timemodel import profile_model
    with torch.device("meta"):
        model = getattr(torchvision.models, model_name)()
    generator = torch.Generator().manual_seed(0)
    jobs: Dict[str, Dict[str, torch.Tensor]] = {}
    for layer in profile_model(model).layers:
        jobs[layer.name] = {}
        for kind, shape in layer.factor_shapes().items():
            n = shape[-1]
            noise = torch.rand(shape, generator=generator)
            jobs[layer.name][kind] = (torch.eye(n).expand(shape) + (noise + noise.transpose(-1, -2)) / (2 * n)).to(device)
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--damping", type=float, default=3e-3)
    args = parser.parse_args()
    from kfac_hvd.factors import damping_shifts, invert_all
    device = torch.device(args.device)
    jobs = factors_of(args.model, device)
    shifts = {name: damping_shifts(list(kinds), args.damping, 1.0) for name, kinds in jobs.items()}
    sizes = {tuple(factor.shape) for kinds in jobs.values() for factor in kinds.values()}
    print(f"{args.model}: {len(jobs)} layers, {sum(len(k) for k in jobs.values())} factors, "
          f"{len(sizes)} distinct shapes; torch threads {torch.get_num_threads()}", flush=True)
    seconds = {True: [], False: []}
    for repeat in range(args.repeats):
        for batched in ((True, False) if repeat % 2 == 0 else (False, True)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            cpu, wall = time.process_time(), time.perf_counter()
            inverses, failed = invert_all(jobs, shifts, "cholesky", batched=batched)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds[batched].append((time.process_time() - cpu, time.perf_counter() - wall))
            assert not failed and len(inverses) == len(jobs)
            print(f"  round {repeat + 1}, {'batched' if batched else 'per factor'}: "
                  f"{seconds[batched][-1][0]:.2f} CPU s, {seconds[batched][-1][1]:.2f} wall s", flush=True)
    for index, what in ((0, "CPU s"), (1, "wall s")):
        batched = statistics.median(s[index] for s in seconds[True])
        single = statistics.median(s[index] for s in seconds[False])
        print(f"median {what}: batched {batched:.2f}, per factor {single:.2f}, batched / per factor "
              f"{batched / single:.3f}")


if __name__ == "__main__":
    main()
