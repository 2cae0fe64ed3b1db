"""Errors that moesim reports to users without a traceback.

Every user-facing error names where the problem is (a file and a field path where there is one)
and what was expected, so that the CLI can print it as one readable message.
"""

from __future__ import annotations

from pathlib import Path


class MoesimError(Exception):
    """Base class of errors that the CLI prints as a message, without a traceback."""


class ConfigError(MoesimError):
    """A scenario, model or hardware file is invalid.

    Args:
        file: The file the bad value came from (None for values given on the command line).
        field: Dotted path of the offending field, e.g. ``policies.capacity.factor``.
        message: What was expected and what was found.
    """

    def __init__(
        self, file: str | Path | None, field: str | None = None, message: str | None = None
    ) -> None:
        if field is None and message is None:  # one argument: the whole message, as SimPy
            self.file, self.field, self.message = None, "", str(file)  # re-raises it
            super().__init__(str(file))
            return
        self.file = str(file) if file is not None else None
        self.field = field or ""
        self.message = message or ""
        where = f"{self.file}: " if self.file else ""
        at = f"{field}: " if field else ""
        super().__init__(f"{where}{at}{message}")


class ConfigErrors(MoesimError):
    """Several configuration errors found at once; each is a :class:`ConfigError`."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class CapacityError(MoesimError):
    """A scenario does not fit the hardware (e.g. HBM), with the numbers that show why."""


class CalibrationError(MoesimError):
    """A calibration could not be built, run or checked (the message says which step and why)."""
