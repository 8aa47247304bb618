"""Entry point: ``python -m launch.train --config FILE [section.key=value ...] [--dry-run]``.

Also installed as ``kfac-hvd-train``.  Start it with ``horovodrun -np N ...`` or ``mpirun -np N ...``
(one process per GPU or per CPU slot); a single process runs without a launcher.  See docs/LAUNCHER.md.

Exit codes: 0 success, 2 configuration error (one line on stderr, printed before any collective).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .config import ConfigError, data_problems, kfac_kwargs, load_config, resolve_paths


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kfac-hvd-train",
        description="Distributed K-FAC (or SGD) training on Horovod, configured by a YAML file.",
        epilog="Example: horovodrun -np 2 --gloo -H localhost:2 python -m launch.train "
               "--config configs/fashion_mnist/small_resnet_kfac_lambda0.25.yaml train.epochs=1")
    parser.add_argument("--config", required=True, help="YAML experiment file")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override a config value (parsed as YAML: null, 0.25, [30, 60], true)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan for train.world_size ranks and exit; launches nothing")
    parser.add_argument("--plan-json", metavar="FILE", help="with --dry-run: also write the plan as JSON")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def config_error(err: ConfigError) -> int:
    print(str(err), file=sys.stderr, flush=True)
    return 2


def precheck(cfg) -> None:
    """Everything that can be checked by each process alone, before Horovod starts (raises ConfigError)."""
    problems = data_problems(cfg)
    if problems:
        raise problems[0]
    resume = cfg.checkpoint.resume
    if resume and resume != "auto" and not os.path.isfile(resume):
        raise cfg.error("checkpoint.resume", f"file not found: {resume}")
    if cfg.optim.method == "kfac":
        check_kfac_options(cfg)
    try:
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        raise ConfigError(cfg.path, None, f"cannot import horovod.torch ({exc}); run 'make setup'") from None


def check_kfac_options(cfg) -> None:
    """Let the library judge the ``kfac`` section on a one-layer model (no Horovod needed)."""
    import torch
    import kfac_hvd
    probe = torch.nn.Sequential(torch.nn.Linear(2, 2))
    try:
        kfac = kfac_hvd.KFAC(probe, **kfac_kwargs(cfg))
    except (TypeError, ValueError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        key = next((f"kfac.{k}" for k in kfac_kwargs(cfg) if k in text), "kfac")
        if "no Linear, Conv2d or BatchNorm2d layer" in text:
            return   # the probe's only layer was skipped by kfac.skip_layers; judged on the real model
        raise cfg.error(key, text) from None
    if hasattr(kfac, "remove_hooks"):
        kfac.remove_hooks()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        resolve_paths(cfg)
        if args.print_config:
            print(cfg.dump(), end="")
            return 0
        if args.dry_run:
            from .plan import dry_run
            if cfg.optim.method == "kfac":
                check_kfac_options(cfg)
            return dry_run(cfg, args.plan_json)
        from .checkpoint import resolve_resume
        precheck(cfg)
        resume_path = resolve_resume(cfg.checkpoint.resume, cfg.checkpoint.dir)
    except ConfigError as err:
        return config_error(err)
    from .loop import run
    try:
        return run(cfg, resume_path)
    except ConfigError as err:     # found while reading the data (e.g. class folders that differ)
        return config_error(err)


if __name__ == "__main__":
    sys.exit(main())
