"""Byte counts as text in binary units (KiB = 1024 bytes)."""

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def in_unit(nbytes: float, unit: str, spec: str = ".2f") -> str:
    """``nbytes`` in ``unit`` ('B', 'KiB', 'MiB' or 'GiB'): in_unit(3 * 2**20, 'MiB') is
    '3.00 MiB'; ``spec`` formats the number."""
    return f"{nbytes / UNITS[unit]:{spec}} {unit}"


def human_bytes(nbytes: float) -> str:
    """Bytes in the largest unit they reach, up to GiB: '4.25 MiB', '512 B'."""
    for unit in ("GiB", "MiB", "KiB"):
        if nbytes >= UNITS[unit]:
            return in_unit(nbytes, unit)
    return f"{nbytes:.0f} B"
