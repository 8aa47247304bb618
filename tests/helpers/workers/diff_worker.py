"""Runs under horovodrun (Horovod) or torchrun (torch.distributed), 2 ranks: two K-FAC steps at fixed
weights, each rank on its own batches, with triangles and whole matrices, raw and noise-aware Diff. Each rank writes rank<r>.json into --out:
the step records, and its own factors and split-half noise computed directly (tests/helpers/direct_factors.py),
from which the test forms the averages."""

import argparse
import sys

import torch

import kfac_hvd
from tests.helpers.direct_factors import (
    direct_factors,
    forward_backward,
    make_model,
    split_half_noise,
    step_inputs,
)
from tests.helpers.workers.engines import (  # before kfac_hvd: it may block Horovod
    finish,
    horovod_importable,
    horovod_modules,
    start_engine,
)

BATCH = 9  # odd: halves of 4 and 5 samples
RUNS = {
    "symmetric": dict(symmetric_comm=True),
    "full": dict(symmetric_comm=False),
    "symmetric-noise": dict(symmetric_comm=True, noise_aware_diff=True),
    "full-noise": dict(symmetric_comm=False, noise_aware_diff=True),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = start_engine()
    model = make_model()  # the same weights on both ranks
    data = [step_inputs(step, BATCH, seed=1 + engine.rank) for step in (1, 2)]
    factors, noise = [], []
    for x, y in data:
        seen = forward_backward(model, x, y)
        factors.append(
            {f"{name}.{kind}": value.tolist() for (name, kind), value in direct_factors(model, seen).items()}
        )
        noise.append(
            {f"{name}.{kind}": value for (name, kind), value in split_half_noise(model, seen).items()}
        )
    runs = {}
    for run_name, options in RUNS.items():
        run_model = make_model()  # the same weights again
        # Every layer owned by one rank: the inverse allgather carries them, as for large layers.
        kfac = kfac_hvd.KFAC(run_model, local_inverse_max_dim=0, **options)
        records = []
        for x, y in data:
            forward_backward(run_model, x, y)
            record = kfac.step()
            records.append({"layers": record["layers"]})
        kfac.remove_hooks()
        runs[run_name] = records
    result = {
        "rank": engine.rank,
        "size": engine.size,
        "engine": engine.name,
        "communicator": type(kfac.comm).__name__,
        "horovod_modules": horovod_modules(),
        "horovod_importable": horovod_importable(),
        "runs": runs,
        "factors": factors,
        "noise": noise,
    }
    return finish(engine, args.out, result)


if __name__ == "__main__":
    sys.exit(main())
