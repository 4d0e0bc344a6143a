"""A registry of bad-input cases, shared by the bad-input and bad-weights batteries.

Each case builds a bad input and returns the call that must fail and the values its expected message
refers to as ``{name}``; the battery's test runs every case and checks the error type and message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Case:
    family: str
    make: Callable[[Any], tuple[Callable[..., Any], dict[str, Any]]]
    """Builds the bad input from a context; returns the call and the values the pattern refers to as {name}."""
    error: type[BaseException]
    pattern: str


class Battery:
    """Named cases, registered with the :meth:`case` decorator."""

    def __init__(self) -> None:
        self.cases: dict[str, Case] = {}

    def case(self, name: str, family: str, error: type[BaseException], pattern: str) -> Callable:
        def register(make: Callable) -> Callable:
            assert name not in self.cases, name
            self.cases[name] = Case(family, make, error, pattern)
            return make
        return register
