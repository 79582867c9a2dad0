"""A process-wide choice among named options, with per-thread overrides: the backend and the CPU half-precision
compute policy are both settings of this kind."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Sequence


class Setting:
    """One of ``choices``: read from ``env_var`` at import (else ``default``), changed by :meth:`set`, and
    overridden for the calls inside a :meth:`use` block of the current thread. Names are case-insensitive; a name
    that is not an option raises a ``ValueError`` naming ``arg`` (how the user passed it) and the options."""

    def __init__(self, what: str, arg: str, choices: Sequence[str], env_var: str, default: str):
        self.what, self.arg, self.choices = what, arg, tuple(choices)
        self._default = self.validated(os.environ.get(env_var, default), env_var)
        self._local = threading.local()

    def validated(self, name: str, source: str) -> str:
        if not isinstance(name, str) or name.strip().lower() not in self.choices:
            raise ValueError(f"{source}={name!r} is not a {self.what}; choose one of {', '.join(self.choices)}")
        return name.strip().lower()

    def set(self, name: str) -> None:
        self._default = self.validated(name, self.arg)

    def get(self) -> str:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else self._default

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        name = self.validated(name, self.arg)
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(name)
        try:
            yield
        finally:
            stack.pop()
