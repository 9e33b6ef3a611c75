"""Errors that the command line reports in one line and exits 2 on (no traceback)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UnavailableError(RuntimeError):
    """The params ask for something this machine cannot run (a strategy, a 4-bit backend, a
    device); the message names the params key and what to install or change."""


class RemoteCodeError(UnavailableError):
    """A model or tokenizer that ships its own Python code to run (auto_map in its config)
    while params do not allow running it."""


@contextmanager
def loading(path: object, key: str, what: str = "the model") -> Iterator[None]:
    """Loading a model or tokenizer from a folder or hub id, with transformers' failures as one
    line: its own code refused (naming the params key that allows it), or not loadable (a
    missing folder, a hub id that is neither cached nor reachable, offline mode on)."""
    try:
        yield
    except ValueError as error:
        if "trust_remote_code" not in str(error):
            raise
        raise RemoteCodeError(
            f"{path}: it ships its own code to run (auto_map in its config), which is off; "
            f"set {key}: true only if you trust that code"
        ) from None
    except OSError as error:
        from huggingface_hub import constants

        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        local = str(path).startswith((".", "/", "~")) or Path(str(path)).exists()
        if local and not Path(str(path)).exists():
            raise UnavailableError(f"{path}: cannot load {what}: no such folder") from None
        hint = ""
        if not local and constants.HF_HUB_OFFLINE:
            hint = "; offline mode is on (HF_HUB_OFFLINE=1): put it in the cache first or name a local folder"
        raise UnavailableError(f"{path}: cannot load {what} ({first}){hint}") from None
