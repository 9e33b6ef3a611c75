"""`rsa-pl merge`: RSA(P), one averaged policy per q in params (docs/method.md, "RSA(P)").

Reads models/sft (or the pretrained base it records), models/reward and models/safety; writes
models/merged/q<q>/ for each q (Hugging Face weights + tokenizer + merge.json saying how it
was made), atomically: all of them or none. With the stage-2 adapter stacked on the stage-1
policy (models/safety/adapter/) each merged policy is W + dH + q dS exactly; with full
stage-2 weights it is the average of the two state dicts.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from rich.console import Console
from transformers import PreTrainedModel

from rsa_pl.errors import fitting
from rsa_pl.merge import average_state_dicts, fold_scaled_adapter
from rsa_pl.models import load_aligned_policy, load_causal_lm, load_tokenizer
from rsa_pl.params_file import load_params
from rsa_pl.pipeline.artifacts import MERGE_RECORD, base_model, merged_folder, trusts_code
from rsa_pl.pipeline.outputs import staging_for, swap_in


def merged_policy(stage1: PreTrainedModel, models: Path, q: float) -> tuple[PreTrainedModel, str]:
    """(1 - q) theta_r + q theta_s, and how it was computed."""
    adapter = models / "safety" / "adapter"
    if (adapter / "adapter_config.json").exists():
        with fitting(adapter, "the stage-1 policy"):  # a stage-2 adapter made on another base: one line
            return fold_scaled_adapter(copy.deepcopy(stage1), adapter, q), "stage-1 policy + q x stage-2 LoRA delta"
    safety = load_causal_lm(models / "safety", trusts_code(models))
    merged = copy.deepcopy(stage1)
    merged.load_state_dict(average_state_dicts(stage1.state_dict(), safety.state_dict(), q))
    return merged, "(1 - q) x stage-1 weights + q x stage-2 weights"


def run(params_path: Path, models: Path, out: Path, console: Console) -> list[Path]:
    """Write models/merged/q<q>/ for every q in params.merge; return the folders."""
    params = load_params(params_path)
    staging = staging_for(out)  # before any model loads: an output that cannot be written fails first
    try:
        # the tokenizer first: a models/safety without one fails before the stage-1 policy loads
        tokenizer = load_tokenizer(models / "safety", params.prepare.tokenizer.trust_remote_code)
        # theta_r, plain weights (a stage-1 adapter made on another base: one line, from the loader)
        stage1 = load_aligned_policy(base_model(models), models / "reward", trusts_code(models))
        for q in params.merge.q:
            model, method = merged_policy(stage1, models, q)
            folder = staging / merged_folder(q)
            model.save_pretrained(str(folder), safe_serialization=True)
            tokenizer.save_pretrained(str(folder))
            record = {"q": q, "method": method, "stage1": str(models / "reward"), "stage2": str(models / "safety")}
            (folder / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            console.print(f"merge: q = {q:g} -> {out / merged_folder(q)} ({method})")
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / merged_folder(q) for q in params.merge.q]
