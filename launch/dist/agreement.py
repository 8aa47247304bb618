"""Ranks must agree: the resolved configuration, the code (kfac_hvd and launch sources, library
versions) and the data, checked from fingerprints every rank allgathers."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from typing import TYPE_CHECKING, Any

import torch

import kfac_hvd
import launch
from launch.errors import EXIT_INPUT, RunStop

if TYPE_CHECKING:
    from launch.config.load import Config


# --------------------------------------------------------------------------------------------------
# Ranks must agree: the resolved configuration and the code
# --------------------------------------------------------------------------------------------------
def fingerprint(value: Any) -> str:
    """sha256 of a JSON-able value, independent of dict order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def config_fingerprint(cfg: Config) -> str:
    return fingerprint(cfg.to_dict())


def _versions() -> dict[str, str]:
    out = {"python": ".".join(platform.python_version_tuple()[:2]), "torch": torch.__version__}
    for name in ("torchvision", "horovod", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "absent"
    return out


def code_files() -> dict[str, str]:
    """sha256 (16 hex digits) of every .py file of the kfac_hvd and launch packages this process imports."""
    files = {}
    for pkg in (kfac_hvd, launch):
        assert pkg.__file__ is not None  # regular packages, with an __init__.py
        root = os.path.dirname(os.path.abspath(pkg.__file__))
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    rel = pkg.__name__ + "/" + os.path.relpath(path, root).replace(os.sep, "/")
                    with open(path, "rb") as fh:
                        files[rel] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return files


def code_fingerprint() -> tuple[str, dict[str, Any]]:
    """(digest, detail): the sources of kfac_hvd and launch plus the versions of the libraries."""
    detail = {"files": code_files(), "versions": _versions()}
    return hashlib.sha256(json.dumps(detail, sort_keys=True).encode()).hexdigest(), detail


def _flat(cfg: Config) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}


def check_agreement(
    hvd: Any,
    cfg: Config,
    layout: list[dict],
    code_detail: dict[str, Any],
    data_identity: dict[str, Any] | None = None,
) -> None:
    """Raise RunStop(2) on every rank when the ranks' config, code or data fingerprints differ.

    ``layout`` is the allgathered per-rank record (with ``config``, ``code`` and ``data`` digests), so
    every rank takes the same decision; the details are exchanged only when something differs.
    """
    ref = layout[0]
    cfg_bad = [r["rank"] for r in layout if r["config"] != ref["config"]]
    code_bad = [r["rank"] for r in layout if r["code"] != ref["code"]]
    data_bad = [r["rank"] for r in layout if r.get("data") != ref.get("data")]
    if not cfg_bad and not code_bad and not data_bad:
        return
    detail = hvd.allgather_object({"config": _flat(cfg), "data": data_identity, **code_detail})
    parts, key = [], None
    if cfg_bad:
        other = cfg_bad[0]
        mine, theirs = detail[0]["config"], detail[other]["config"]
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        key = keys[0] if keys else None
        shown = ", ".join(
            f"{k}: {theirs.get(k)!r} on rank {other}, {mine.get(k)!r} on rank 0" for k in keys[:3]
        )
        more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
        parts.append(
            f"ranks disagree on the resolved configuration (ranks differing from rank 0: "
            f"{_ranks(cfg_bad)}): {shown}{more}"
        )
    if code_bad:
        other = code_bad[0]
        mine, theirs = detail[0], detail[other]
        files = sorted(
            f
            for f in set(mine["files"]) | set(theirs["files"])
            if mine["files"].get(f) != theirs["files"].get(f)
        )
        versions = [
            f"{k} {theirs['versions'].get(k)} on rank {other}, {v} on rank 0"
            for k, v in mine["versions"].items()
            if theirs["versions"].get(k) != v
        ]
        what = ", ".join(files[:4]) + (f" (+{len(files) - 4} more)" if len(files) > 4 else "")
        parts.append(
            f"ranks run different code (ranks differing from rank 0: {_ranks(code_bad)}): "
            + "; ".join(x for x in ([f"files {what}"] if files else []) + versions)
        )
    if data_bad:
        other = data_bad[0]
        mine, theirs = detail[0].get("data") or {}, detail[other].get("data") or {}
        fields = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        shown = ", ".join(
            f"{k}: {theirs.get(k)!r} on rank {other}, {mine.get(k)!r} on rank 0" for k in fields
        )
        data_key = {
            "imagenet": "data.train_dir" if any(f.startswith("train") for f in fields) else "data.val_dir",
            "fashion_mnist": "data.fashion_mnist_dir",
        }.get(cfg.data.dataset, "data.dataset")
        key = key or data_key
        parts.append(f"ranks see different data (ranks differing from rank 0: {_ranks(data_bad)}): {shown}")
    where = f"{cfg.source(key)}: {key}" if key else cfg.path
    raise RunStop(EXIT_INPUT, f"config error: {where}: " + "; ".join(parts))


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" (+{len(ranks) - 8} more)" if len(ranks) > 8 else "")
