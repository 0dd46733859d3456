"""The option vocabulary: one owner for option names like ``w4a8`` and the option table.

Usage:
    option_name((4, 8))              # "w4a8"
    parse_option("w4a8")             # (4, 8); a clear ValueError for anything else
    option_table([2, 4, 8], [4, 8])  # [(8, 8), (8, 4), (4, 8), (4, 4), (2, 8), (2, 4)]

Budget names (``avg_bits-3``) are owned by :class:`mpqflow.optimize.Budget`.
"""

from __future__ import annotations

import re

__all__ = ["OPTION_RE", "option_name", "parse_option", "option_table"]

OPTION_RE = re.compile(r"^w([0-9]+)a([0-9]+)$")


def option_name(option) -> str:
    """'w4a8' for (4, 8)."""
    return f"w{int(option[0])}a{int(option[1])}"


def parse_option(name: str) -> tuple[int, int]:
    """(4, 8) for 'w4a8'; ValueError naming the string otherwise."""
    m = OPTION_RE.match(str(name))
    if not m:
        raise ValueError(f"option {name!r}: expected w<weight bits>a<activation bits>, e.g. 'w4a8'")
    return int(m.group(1)), int(m.group(2))


def option_table(w_bits, a_bits) -> list[tuple[int, int]]:
    """All (w_bits, a_bits) options, highest precision first."""
    return [(w, a) for w in sorted(w_bits, reverse=True) for a in sorted(a_bits, reverse=True)]
