"""Read a Horovod timeline (``HOROVOD_TIMELINE``, Chrome-trace JSON) back as named collectives.

Used to check the library's traffic counters against Horovod's own record of what it moved.
"""

from __future__ import annotations

import json
import math
import re

ELEMENT_BYTES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "int8": 1,
}


def read_collectives(path: str, prefix: str = "kfac.") -> dict[tuple[str, str], list[int]]:
    """(op, tensor name) → [count, bytes] for tensors whose name starts with ``prefix``.

    Horovod names a tensor's row "<op>.<tensor name>" and puts dtype and shape on the closing event of
    each operation. Horovod 0.28.1 leaves dtype and shape off a broadcast rooted at the rank that writes
    the timeline (rank 0): such broadcasts are counted with 0 bytes.
    """
    with open(path) as handle:
        text = handle.read().strip().rstrip(",")
    if not text.endswith("]"):
        text += "]"  # a timeline whose job is still running (or was killed) has an open array
    events = json.loads(text)
    rows = {
        event["pid"]: event["args"]["name"]
        for event in events
        if event.get("ph") == "M" and event.get("name") == "process_name" and "name" in event.get("args", {})
    }
    found: dict[tuple[str, str], list[int]] = {}
    for event in events:
        op, _, tensor = rows.get(event.get("pid"), "").partition(".")
        if not tensor.startswith(prefix):
            continue
        entry = found.setdefault((op, tensor), [0, 0])
        args = event.get("args", {})
        if event.get("ph") == "B" and event.get("name") == op.upper():
            entry[0] += 1
        elif event.get("ph") == "E" and "dtype" in args:
            shape = [int(value) for value in re.findall(r"\d+", args["shape"])]
            entry[1] += math.prod(shape) * ELEMENT_BYTES[args["dtype"]]
    return found
