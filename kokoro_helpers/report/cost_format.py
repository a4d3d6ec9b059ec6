"""How 05_cost writes money and a figure's basis: USD and JPY strings, "computed" or "estimate"."""
from __future__ import annotations

import math


def fmt_usd(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if abs(x) >= 1 or x == 0:
        return f"${x:,.2f}"
    if abs(x) >= 0.01:
        return f"${x:,.4f}"
    return "$" + f"{x:.8f}".rstrip("0")          # tiny amounts keep their significant digits


def fmt_jpy(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"¥{x:,.0f}" if abs(x) >= 10 else f"¥{x:,.2f}"


def basis(is_estimate: bool) -> str:
    return "estimate" if is_estimate else "computed"
