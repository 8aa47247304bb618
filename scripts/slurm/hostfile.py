"""Print an Open MPI hostfile of a Slurm allocation: one ``host slots=N`` line per node.

The nodes come from ``$SLURM_JOB_NODELIST`` in Slurm's compressed syntax (``gpu[01-03,07],login2``),
expanded by ``scontrol show hostnames`` where scontrol is on PATH and by :func:`expand_nodelist` (the same
grammar) where it is not; the slots from ``$SLURM_TASKS_PER_NODE`` (``8(x3),4``: 8 on each of three nodes,
then 4). Standard library only: the job script runs it before the venv matters.

    python scripts/slurm/hostfile.py > hosts.txt
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [p for p in parts if p]


def _range_values(spec: str) -> list[str]:
    """``01-03,07`` -> 01 02 03 07 (zero padding kept, as Slurm does)."""
    values = []
    for item in spec.split(","):
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"bad range {item!r} in node list")
        if not sep:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in node list")
        width = len(lo) if lo.startswith("0") else 0
        values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
    return values


def _expand_one(name: str) -> list[str]:
    start = name.find("[")
    if start < 0:
        return [name]
    end = name.index("]", start)
    head, spec, rest = name[:start], name[start + 1 : end], name[end + 1 :]
    return [head + value + tail for value in _range_values(spec) for tail in _expand_one(rest)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed node list as host names, in order: ``n[1-2],m`` -> n1 n2 m."""
    return [host for part in _split_top(nodelist.strip()) for host in _expand_one(part)]


def expand_tasks_per_node(spec: str) -> list[int]:
    """``$SLURM_TASKS_PER_NODE`` as one count per node: ``2(x3),1`` -> 2 2 2 1."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise ValueError(f"bad SLURM_TASKS_PER_NODE entry {item!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def hostnames(nodelist: str) -> list[str]:
    if shutil.which("scontrol"):
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        return out.stdout.split()
    return expand_nodelist(nodelist)


def hostfile_lines(nodelist: str, tasks_per_node: str) -> list[str]:
    hosts = hostnames(nodelist)
    counts = expand_tasks_per_node(tasks_per_node)
    if len(counts) != len(hosts):
        raise ValueError(
            f"SLURM_TASKS_PER_NODE={tasks_per_node!r} gives {len(counts)} node(s), "
            f"SLURM_JOB_NODELIST={nodelist!r} {len(hosts)}"
        )
    return [f"{host} slots={n}" for host, n in zip(hosts, counts, strict=True)]


def main() -> int:
    try:
        nodelist = os.environ["SLURM_JOB_NODELIST"]
        tasks = os.environ["SLURM_TASKS_PER_NODE"]
        lines = hostfile_lines(nodelist, tasks)
    except KeyError as exc:
        print(f"hostfile.py: ${exc.args[0]} is not set (run inside a Slurm allocation)", file=sys.stderr)
        return 2
    except (ValueError, subprocess.CalledProcessError) as exc:
        print(f"hostfile.py: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
