"""RSA(P): the weight average theta = (1 - q) theta_r + q theta_s of the two stages' policies.

Two exact forms (docs/method.md, "RSA(P)"):
- stacked LoRA (the stage-2 adapter dS trained on the stage-1 policy W + dH): the average is
  W + dH + q dS, i.e. the stage-2 adapter folded in at scale q (`fold_scaled_adapter`);
- full weights: an average of the two state dicts (`average_state_dicts`), computed in
  float64 and cast back to each tensor's dtype, refusing mismatched keys, shapes or dtypes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedModel


class MergeError(ValueError):
    """Two policies that cannot be averaged (different keys, shapes or dtypes, or a bad q)."""


def check_q(q: float) -> None:
    if not 0.0 <= q <= 1.0:
        raise MergeError(f"q must be in [0, 1], got {q}")


def average_state_dicts(reward: Mapping[str, Tensor], safety: Mapping[str, Tensor], q: float) -> dict[str, Tensor]:
    """(1 - q) reward + q safety, key by key; integer and boolean tensors (buffers such as
    position ids) must be equal and are kept."""
    check_q(q)
    missing, extra = sorted(set(reward) - set(safety)), sorted(set(safety) - set(reward))
    if missing or extra:
        what = [f"only in the stage-1 policy: {', '.join(missing[:3])}"] if missing else []
        what += [f"only in the stage-2 policy: {', '.join(extra[:3])}"] if extra else []
        raise MergeError(f"the policies have different parameters ({'; '.join(what)})")
    merged: dict[str, Tensor] = {}
    for name, a in reward.items():
        b = safety[name]
        if a.shape != b.shape:
            raise MergeError(f"{name}: shape {tuple(a.shape)} in the stage-1 policy, {tuple(b.shape)} in stage 2")
        if a.dtype != b.dtype:
            raise MergeError(f"{name}: dtype {a.dtype} in the stage-1 policy, {b.dtype} in stage 2")
        if not a.is_floating_point():
            if not torch.equal(a, b):
                raise MergeError(f"{name}: non-float tensors differ between the policies; they cannot be averaged")
            merged[name] = a.clone()
            continue
        mixed = (1.0 - q) * a.double() + q * b.double()
        merged[name] = mixed.to(a.dtype)
    return merged


def fold_scaled_adapter(model: PreTrainedModel, adapter: str | Path, q: float) -> PreTrainedModel:
    """model + q * (the LoRA adapter's delta), as plain weights: W + dH + q dS when model is
    the stage-1 policy W + dH and adapter the stage-2 adapter dS trained on it."""
    check_q(q)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        for name, weight in peft_model.named_parameters():
            if ".lora_B." in name or ".lora_embedding_B." in name:
                weight.mul_(q)  # delta = B A * scaling is linear in B
    return peft_model.merge_and_unload()
