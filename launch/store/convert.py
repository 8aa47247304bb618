"""``python -m launch.checkpoint convert FILE [--out OUT]``: a user vouches for a checkpoint file.

The file is unpickled without restriction (so only for files the user trusts), rewritten in the
current format (RNG states as tensors and numbers) and listed, with size and sha256, in the
``checkpoints.json`` beside it; from then on the launcher verifies and loads it like its own.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import time

import torch

from launch.errors import CheckpointError
from launch.store.checkpoint import (
    FORMAT,
    LAST,
    MANIFEST,
    REQUIRED,
    atomic_save,
    read_manifest,
    read_manifest_file,
    write_manifest,
)
from launch.store.rng import plain_rng_states


def convert(path: str, out: str | None = None) -> str:
    """Rewrite ``path`` (a checkpoint the user trusts: it is unpickled without restriction) in today's
    format as ``out`` (default: in place) and list it, size and sha256, in the manifest beside it."""
    out = out or path
    if os.path.basename(out) == LAST:
        raise CheckpointError(f"{out}: give the step_*.pt file that {LAST} points to, or another --out")
    state = torch.load(path, map_location="cpu", weights_only=False)  # the user vouches for this file
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        raise CheckpointError(f"{path}: not a checkpoint of this launcher")
    state["rng"] = [
        r if isinstance(r.get("numpy"), dict) else {**r, **plain_rng_states(r["numpy"], r["python"])}
        for r in state["rng"]
    ]
    state["format"] = FORMAT
    info = atomic_save(state, out)
    folder, name = os.path.dirname(os.path.abspath(out)), os.path.basename(out)
    entry = {
        "file": name,
        "step": int(state["step"]),
        "epoch": state["epoch"],
        "batch_in_epoch": state["batch_in_epoch"],
        **info,
        "time": time.time(),
        "converted_from": path,
    }
    entries = [e for e in read_manifest(folder) if e["file"] != name] + [entry]
    write_manifest(
        folder, sorted(entries, key=lambda e: -e["step"]), read_manifest_file(folder).get("last") or name
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.checkpoint")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser(
        "convert",
        help="rewrite a checkpoint you trust in the current format and list it "
        "in the checkpoints.json beside it (its code, if any, runs: only "
        "for files you trust)",
    )
    conv.add_argument("file")
    conv.add_argument("--out", help="write the converted checkpoint here (default: in place)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.file, args.out)
    except (CheckpointError, OSError, pickle.UnpicklingError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(
        f"converted {args.file} -> {out}; listed in {os.path.join(os.path.dirname(os.path.abspath(out)), MANIFEST)}"
    )
    return 0
