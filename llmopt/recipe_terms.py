"""Errors of a stage that ran under ``convert`` name recipe fields, not the stage subcommand's flags.

The stages raise in the words of their own subcommand (``pass --eval-text FILE``); under ``convert``
those settings come from the recipe, so :func:`in_recipe_terms` rewrites each flag into the recipe
field it comes from and says how to change it there. Flags of ``convert`` itself (``--force``,
``--set``, ``--from``, ``-w``) stay as they are.
"""

from __future__ import annotations

import re

from llmopt.errors import UserError

# subcommand flag -> recipe field
FIELDS = {
    "--calibration": "quantize.calibration.text",
    "--kv-calibration": "build.kv_calibration.text",
    "--seq-len": "quantize.calibration.seq_len",
    "--method": "quantize.method",
    "--bits": "quantize.bits",
    "--group-size": "quantize.group_size",
    "--error-stats": "quantize.error_stats",
    "--opset": "export.opset",
    "--dtype": "export.dtype",
    "--batch": "envelope.batch",
    "--input-len": "envelope.input_len",
    "--total-len": "envelope.total_len",
    "--backend": "build.backend",
    "--device": "build.device",
    "--threads": "build.threads",
    "--attention": "build.attention",
    "--kv-cache": "build.kv_cache",
    "--workspace": "build.workspace_gib",
    "--hardware-compat": "build.hardware_compat",
    "--version-compatible": "build.version_compatible",
    "--eval-text": "validate.eval_text",
    "--eval-tokens": "validate.eval_tokens",
    "--decode-tokens": "validate.decode_tokens",
    "--gate": "validate.gates",
    "--no-gates": "validate.gates: none",
}
# an optional "llmopt STAGE " before the flag, the flag, an optional metavar after it (FILE, MIN,OPT,MAX)
_FLAG = re.compile(r"(?:llmopt [a-z]+ )?(--[a-z][a-z-]*)(?: (?:[A-Z][A-Z,]*)\b)?")
_PASS = re.compile(r"\bpass (?=(?:quantize|export|envelope|build|validate)\.)")


def _rewrite(text: str) -> tuple[str, bool]:
    found = False

    def sub(m: re.Match) -> str:
        nonlocal found
        field = FIELDS.get(m.group(1))
        if field is None:
            return m.group(0)
        found = True
        return field

    out = _FLAG.sub(sub, text)
    return (_PASS.sub("set ", out) if found else out), found


def in_recipe_terms(exc: UserError) -> UserError:
    """``exc`` with subcommand flags replaced by the recipe fields they correspond to (``exc`` itself when
    it names none)."""
    if type(exc) is not UserError:  # RecipeError & co. already speak in recipe fields
        return exc
    message, m_found = _rewrite(exc.message)
    hint, h_found = _rewrite(exc.hint) if exc.hint else (exc.hint, False)
    if not (m_found or h_found):
        return exc
    hint = (hint + "; " if hint else "") + "change it in the recipe or with --set FIELD=VALUE"
    new = UserError(message, hint)
    new.__cause__ = exc.__cause__
    return new
