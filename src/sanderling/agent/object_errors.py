"""Per-object model errors, reported once per distinct problem (a log line and a Kubernetes Event).

Informers resend objects on every relist and update; an object that stays broken must not flood
the log or the Events, and one that gets fixed must be reported again if it breaks again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sanderling.model.errors import ModelError

log = logging.getLogger(__name__)
T = TypeVar("T")


class ObjectErrors:
    def __init__(self, report: Callable[[str, str, str], None] | None = None) -> None:
        self.report = report  # (namespace, name, message) -> Event on the object
        self.errors: dict[str, str] = {}
        self.warnings: dict[str, str] = {}  # objects handled, but not entirely as written

    def warn(self, key: str, message: str | None) -> None:
        """The object is in use but part of it is not (message), or all of it is again (None);
        reported once per distinct message, like errors."""
        if message is None:
            self.warnings.pop(key, None)
        else:
            self._once(self.warnings, key, message)

    def convert(self, key: str, raw: dict[str, Any] | None, build: Callable[[dict[str, Any]], T]) -> T | None:
        """build(raw), or None when the object is absent or refused (reported once per message)."""
        if raw is None:
            self.errors.pop(key, None)
            return None
        try:
            out = build(raw)
            self.errors.pop(key, None)
            return out
        except ModelError as exc:
            problem = str(exc)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
            # a field of a type the model did not expect: this object's error, never the agent's
            log.debug("%s: conversion failed", key, exc_info=True)
            problem = f"{key}: malformed object ({type(exc).__name__}: {exc})"
        self._once(self.errors, key, problem)
        return None

    def _once(self, seen: dict[str, str], key: str, message: str) -> None:
        """Log and report `message` unless it is what was last said about `key`."""
        if seen.get(key) != message:
            log.error("%s", message)
            if self.report is not None:
                ns, _, name = key.partition("/")
                self.report(ns, name, message)
        seen[key] = message
