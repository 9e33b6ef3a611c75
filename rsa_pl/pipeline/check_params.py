"""`rsa-pl check-params`: validate params.yaml and show the resolved parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.tree import Tree

from rsa_pl.config import Params
from rsa_pl.params_file import load_params


def _add(tree: Tree, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _add(tree.add(f"[bold]{key}[/bold]"), value)
        else:
            tree.add(f"{key}: [cyan]{value!r}[/cyan]")


def run(params_path: Path, console: Console) -> Params:
    """Load params_path (raises ParamsError listing every problem) and print it as a tree."""
    params = load_params(params_path)
    tree = Tree(f"[bold green]{params_path}[/bold green] is valid")
    _add(tree, params.model_dump())
    console.print(tree)
    return params
