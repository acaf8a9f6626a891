"""The CLI's entry point: exit codes (0 ok, 1 user error, 2 gate failed, 130/143 interrupted, 70 a bug),
one error line on stderr, and SIGINT/SIGTERM turned into a clean interrupt."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from llmopt.errors import GateFailed, UserError


def _click_errors(name: str) -> tuple[type[BaseException], ...]:
    """Typer vendors its own click; catch both its and click's exception classes."""
    found = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as vendored

        found.append(getattr(vendored, name))
    except (ImportError, AttributeError):
        pass
    return tuple(found)


def _error(text: str) -> None:
    sys.stderr.write(text.rstrip() + "\n")
    sys.stderr.flush()


def _on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
    from llmopt.errors import interrupt

    interrupt(signum)


def _install_signal_handlers() -> dict:
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # an ignored signal stays ignored (nohup, CI runners)
            previous[sig] = signal.signal(sig, _on_signal)
    return previous


def run(app: Any, argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0 ok, 1 user error, 2 gate failed, 130 interrupted, 70 a bug."""
    from llmopt.errors import clear_interrupt

    clear_interrupt()
    try:
        previous = _install_signal_handlers()
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        return _main(app, argv)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(app: Any, argv: list[str] | None) -> int:
    from llmopt.errors import BUG_EXIT, INTERRUPTED_EXIT, Interrupted, environment_error

    try:
        rv = app(args=argv, standalone_mode=False, prog_name="llmopt")
        return rv if isinstance(rv, int) else 0
    except _click_errors("UsageError") as exc:
        _error(f"error: {exc.format_message()}")  # type: ignore[attr-defined]
        return 1
    except UserError as exc:
        _error(f"error: {exc}")
        return 1
    except GateFailed as exc:
        _error(f"validation failed: {'; '.join(exc.failed)}")
        return 2
    except Interrupted as exc:
        _error(f"interrupted ({signal.Signals(exc.signum).name}): nothing was committed, partial output removed")
        return exc.exit_code
    except (*_click_errors("Abort"), KeyboardInterrupt):
        _error("interrupted: nothing was committed, partial output removed")
        return INTERRUPTED_EXIT
    except _click_errors("Exit") as exc:
        return exc.exit_code  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - the one place that tells user errors from bugs
        user = environment_error(exc)
        if user is not None:
            _error(f"error: {user}")
            return 1
        import traceback

        traceback.print_exc()
        _error(f"llmopt: internal error ({type(exc).__name__}); this is a bug, please report it with the "
               f"traceback above (exit {BUG_EXIT})")
        return BUG_EXIT
