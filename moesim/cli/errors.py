"""Printing user errors as messages, not tracebacks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from moesim.errors import MoesimError

EXIT_USER_ERROR = 2


@contextmanager
def reported() -> Iterator[None]:
    """Turn :class:`MoesimError` (bad scenario, does not fit, unknown name) into a red
    message on stderr and exit status 2."""
    try:
        yield
    except MoesimError as exc:
        from rich.console import Console

        console = Console(stderr=True, highlight=False, soft_wrap=True)
        lines = str(exc).splitlines() or [type(exc).__name__]
        for line in lines:
            console.print(f"[bold red]error:[/] {line}", markup=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
