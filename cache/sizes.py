"""Human byte sizes: parse what users type (`--max-size 10GB`) and print sizes back."""

import re
from fractions import Fraction

# Decimal units are spelled with a B ("GB" = 10^9), IEC units with "iB" ("GiB" = 2^30). A bare
# letter ("10G") means the binary unit, as in `du -h`/`df -h`, which is what users compare against.
_UNITS: dict[str, int] = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _UNITS[_letter] = 1024**_power
    _UNITS[_letter + "b"] = 1000**_power
    _UNITS[_letter + "ib"] = 1024**_power

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse "10GB", "500MiB", "1.5G", "0" into bytes (GB = 1e9, GiB = G = 2**30)."""
    match = _SIZE_RE.fullmatch(text) if isinstance(text, str) else None
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: write a number with an optional unit, "
            "e.g. 0, 500MiB, 10GB or 1.5G (G = GiB = 2^30 bytes, GB = 10^9 bytes)"
        )
    # Fraction keeps "1.5G" exact instead of going through a binary float.
    return int(Fraction(match.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """Format a byte count with binary units: 512 B, 2.2 MiB, 9.2 GiB."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    if n < 1024:
        return f"{sign}{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{sign}{value:.1f} {unit}"
