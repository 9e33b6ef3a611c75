"""Errors that the command line reports in one line and exits 2 on (no traceback)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class UnavailableError(RuntimeError):
    """The params ask for something this machine cannot run (a strategy, a 4-bit backend, a
    device); the message names the params key and what to install or change."""


class RemoteCodeError(UnavailableError):
    """A model or tokenizer that ships its own Python code to run (auto_map in its config)
    while params do not allow running it."""


class AdapterMismatchError(UnavailableError):
    """A LoRA adapter put on a model other than the one it was trained on (other shapes, or
    target modules the model lacks): a stage's adapter made on another base."""


@contextmanager
def fitting(adapter: str | Path, model: object) -> Iterator[None]:
    """peft putting the LoRA adapter in folder `adapter` on `model` (what to call the model in the
    message: its folder, or "the stage-1 policy"): an adapter made on another base is one line
    naming its folder, with torch's size-mismatch line or peft's missing-modules line. Other
    failures (out of memory, a broken file) pass through unchanged."""
    from peft import NoMatchingPeftModuleError  # here: errors.py is imported by code that never loads peft

    try:
        yield
    except (RuntimeError, NoMatchingPeftModuleError) as error:
        text = str(error)
        mismatch = isinstance(error, NoMatchingPeftModuleError) or "size mismatch" in text
        if isinstance(error, UnavailableError) or not mismatch:
            raise
        lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(error).__name__]
        detail = next((line for line in lines if "mismatch" in line), lines[0])
        raise AdapterMismatchError(f"{adapter}: this adapter was not made on {model} ({detail})") from None


class PickledCodeError(UnavailableError):
    """A pickle (a training checkpoint, a .bin weights file) that carries Python code to run when
    loaded: torch.load(weights_only=True) refused it, and the code did not run."""


@contextmanager
def weights_only(file: str | Path, advice: str, key: str | None = None) -> Iterator[None]:
    """torch.load(file, weights_only=True) inside: a file that carries code (a global other than
    tensors and plain containers, which unpickling would call) is one line naming it (and the
    params key that named it), saying it was refused and `advice`: what to do instead."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):  # a broken file, not a refused one
            raise
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        calls = f" ({found.group(1)})" if found else ""
        where = f"{key}: " if key else ""
        raise PickledCodeError(
            f"{where}{file}: refused: it carries code to run when loaded{calls}, and only weights are read "
            f"(torch.load with weights_only=True); {advice}"
        ) from None


# What a folder holds when it has a tokenizer (fast, slow or GGUF); loading() names their absence.
TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model", "*.tiktoken", "*.gguf")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


@contextmanager
def loading(path: object, key: str, what: str = "the model") -> Iterator[None]:
    """Loading a model or tokenizer from a folder or hub id, with transformers' failures as one
    line: its own code refused (naming the params key that allows it), or not loadable (a
    missing folder, a hub id that is neither cached nor reachable, offline mode on, a local
    folder whose tokenizer cannot be built: no tokenizer files in it, or broken ones)."""
    try:
        yield
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise RemoteCodeError(
                f"{path}: it ships its own code to run (auto_map in its config), which is off; "
                f"set {key}: true only if you trust that code"
            ) from None
        folder = Path(str(path))
        if not (folder.is_dir() and "tokenizer" in str(error).lower()):
            raise
        # a local folder whose tokenizer cannot be built (transformers: "Couldn't instantiate the
        # backend tokenizer ..."): most often a model saved without its tokenizer files
        if not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
            raise UnavailableError(
                f"{path}: cannot load {what}: no tokenizer files in it (tokenizer.json, tokenizer_config.json)"
            ) from None
        raise UnavailableError(f"{path}: cannot load {what} ({_first_line(error)})") from None
    except OSError as error:
        from huggingface_hub import constants

        first = _first_line(error)
        local = str(path).startswith((".", "/", "~")) or Path(str(path)).exists()
        if local and not Path(str(path)).exists():
            raise UnavailableError(f"{path}: cannot load {what}: no such folder") from None
        hint = ""
        if not local and constants.HF_HUB_OFFLINE:
            hint = "; offline mode is on (HF_HUB_OFFLINE=1): put it in the cache first or name a local folder"
        raise UnavailableError(f"{path}: cannot load {what} ({first}){hint}") from None
