"""Values of CLI options that need more than Typer's types: envelope triples and --gate items."""

from __future__ import annotations

from typing import Any, Optional

from llmopt.errors import UserError


def triple(text: Optional[str], name: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{name} {text!r}: expected MIN,OPT,MAX integers", f"e.g. --{name} 1,128,1024") from None
    if len(vals) != 3:
        raise UserError(f"--{name} {text!r}: expected three values MIN,OPT,MAX")
    return vals


def gates(items: Optional[list[str]], no_gates: bool) -> dict | str:
    if no_gates or [i.strip().lower() for i in items or []] == ["none"]:
        if no_gates and items:
            raise UserError("--no-gates and --gate together: choose one")
        return "none"
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--gate {item!r}: expected NAME=VALUE", "e.g. --gate min_top1_agreement=0.98")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise UserError(f"--gate {item!r}: value is not a number") from None
    return out
