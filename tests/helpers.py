"""Helpers the test modules share (fixtures live in conftest.py): independent expectations built
by hand, not with the code under test."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file


def lora_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """The weight change a saved LoRA adapter makes, by weight name: B @ A * alpha / r (rsLoRA:
    alpha / sqrt(r)), transposed for an embedding, read from its safetensors and config by hand
    (not through peft), in float64."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if config[k]]
    assert not unsupported, f"not computed by hand here: {unsupported}"
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    deltas: dict[str, torch.Tensor] = {}
    for key, a in weights.items():
        name = key.removeprefix("base_model.model.")
        if ".lora_A." in key:
            b = weights[key.replace(".lora_A.", ".lora_B.")]
            deltas[name.replace(".lora_A.weight", ".weight")] = (b.double() @ a.double()) * scaling
        elif key.endswith(".lora_embedding_A"):
            b = weights[key.replace("lora_embedding_A", "lora_embedding_B")]
            deltas[name.replace(".lora_embedding_A", ".weight")] = (b.double() @ a.double()).T * scaling
    assert deltas, f"no LoRA weights in {adapter}"
    return deltas


def folded(state: Mapping[str, torch.Tensor], adapter: Path, q: float = 1.0) -> dict[str, torch.Tensor]:
    """state + q * the adapter's delta, in float64, cast back to each weight's dtype."""
    deltas = lora_deltas(adapter)
    missing = deltas.keys() - state.keys()
    assert not missing, f"the adapter changes weights the model does not have: {sorted(missing)[:3]}"
    return {k: (w.double() + q * deltas[k]).to(w.dtype) if k in deltas else w for k, w in state.items()}
