"""Errors that the command line reports in one line and exits 2 on (no traceback)."""

from __future__ import annotations


class UnavailableError(RuntimeError):
    """The params ask for something this machine cannot run (a strategy, a 4-bit backend, a
    device); the message names the params key and what to install or change."""
