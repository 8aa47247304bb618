"""How the tools write a number of bytes."""

from __future__ import annotations

DECIMAL_UNITS = (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0))


def format_bytes(value: float | None, digits: int = 2, unit: str | None = None) -> str:
    """Decimal units (kB = 1000 B), the largest that keeps the value at least 1: ``1.72 TB``,
    ``856.58 GB``, ``428 B`` (whole bytes); ``unit`` fixes the unit (a table column); ``-`` for None."""
    if value is None:
        return "-"
    sizes = dict(DECIMAL_UNITS)
    if unit is None:
        unit = next(name for name, size in DECIMAL_UNITS if abs(value) >= size or name == "B")
    return f"{value:.0f} B" if unit == "B" else f"{value / sizes[unit]:.{digits}f} {unit}"
