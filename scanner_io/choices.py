"""The base of every fixed vocabulary (backends, precisions, modes): a string enum.

A `Choice` member is its value wherever a string is expected — in JSON, in TOML, in a log line,
in an f-string and in comparisons — so settings hold the enum and the wire keeps plain strings.
Each vocabulary is defined once, by the package that owns the concept; CLI and config import it.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from scanner_io.errors import ThzEdgeError

C = TypeVar("C", bound="Choice")


class Choice(str, Enum):
    """A string-valued enum that formats as its value (not as `Class.member`)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """Return the allowed values in definition order."""
        return tuple(str(m.value) for m in cls)

    @classmethod
    def parse(cls: type[C], value: object, what: str) -> C:
        """Return the member for `value` (a member or its string); one line naming the choices if none."""
        try:
            return cls(value)
        except ValueError:
            raise ThzEdgeError(f"unknown {what} {value!r}; use one of {', '.join(cls.values())}") from None
