"""RSA(P) merging: the algebra on hand-made tensors, the stacked-LoRA form against dense
averaging, the endpoints q = 0 / 1 against the stages' own policies, and the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from rich.console import Console
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from rsa_pl.merge import MergeError, average_state_dicts, fold_scaled_adapter
from rsa_pl.models import load_aligned_policy, load_causal_lm
from rsa_pl.pipeline import merge, preference
from rsa_pl.pipeline.artifacts import MERGE_RECORD
from rsa_pl.pipeline.cli import app
from tests.helpers import folded, lora_deltas, stage_params

QUIET = Console(quiet=True)
TOKENS = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(TOKENS).logits


def test_average_of_hand_made_state_dicts() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.bfloat16), "ids": torch.arange(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([3.0], dtype=torch.bfloat16), "ids": torch.arange(3)}
    merged = average_state_dicts(a, b, 0.25)
    torch.testing.assert_close(merged["w"], torch.tensor([1.5, 3.0]), rtol=0, atol=0)
    assert merged["h"].dtype == torch.bfloat16
    assert merged["h"].item() == 1.5
    assert torch.equal(merged["ids"], torch.arange(3))
    assert torch.equal(average_state_dicts(a, b, 0.0)["w"], a["w"])
    assert torch.equal(average_state_dicts(a, b, 1.0)["w"], b["w"])


@pytest.mark.parametrize(
    ("b", "message"),
    [
        ({"w": torch.zeros(2), "x": torch.zeros(1)}, r"different parameters \(only in the stage-2 policy: x\)$"),
        ({"v": torch.zeros(2)}, r"\(only in the stage-1 policy: w; only in the stage-2 policy: v\)$"),
        ({"w": torch.zeros(3)}, r"w: shape \(2,\) in the stage-1 policy, \(3,\) in stage 2"),
        ({"w": torch.zeros(2, dtype=torch.float16)}, "w: dtype torch.float32 in the stage-1 policy"),
    ],
)
def test_mismatched_policies_are_refused(b: dict[str, torch.Tensor], message: str) -> None:
    with pytest.raises(MergeError, match=message):
        average_state_dicts({"w": torch.zeros(2)}, b, 0.5)


def test_differing_integer_buffers_are_refused() -> None:
    with pytest.raises(MergeError, match="ids: non-float tensors differ"):
        average_state_dicts({"ids": torch.arange(3)}, {"ids": torch.arange(1, 4)}, 0.5)


def test_q_outside_the_unit_interval_is_refused() -> None:
    with pytest.raises(MergeError, match=r"q must be in \[0, 1\], got 1.5"):
        average_state_dicts({"w": torch.zeros(1)}, {"w": torch.zeros(1)}, 1.5)


def test_fold_scaled_adapter_adds_q_times_every_lora_delta_embeddings_included(tmp_path: Path) -> None:
    """W + q B A alpha / r for the linear layers and (B A)^T alpha / r for a LoRA on the token
    embedding, as read from the adapter's files by hand; a q outside [0, 1] is refused first."""
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    base.save_pretrained(str(tmp_path / "base"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "down_proj"])
    adapted = get_peft_model(LlamaForCausalLM.from_pretrained(str(tmp_path / "base")), lora)
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_" in name:
                weight.normal_()  # a trained adapter (peft starts B, or an embedding's A, at zero)
    adapted.save_pretrained(str(tmp_path / "adapter"))
    deltas = lora_deltas(tmp_path / "adapter")
    assert all(d.abs().min() > 0 for d in deltas.values())
    assert any(k.endswith("embed_tokens.weight") for k in deltas)
    merged = fold_scaled_adapter(LlamaForCausalLM.from_pretrained(str(tmp_path / "base")), tmp_path / "adapter", 0.3)
    want = folded(base.state_dict(), tmp_path / "adapter", 0.3)
    got = merged.state_dict()
    assert got.keys() == want.keys()
    for name, weight in want.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-6, atol=1e-6, msg=name)
    for q in (-0.1, 1.5, float("nan")):
        with pytest.raises(MergeError, match=r"q must be in \[0, 1\]"):
            fold_scaled_adapter(LlamaForCausalLM.from_pretrained(str(tmp_path / "base")), tmp_path / "adapter", q)


def _stage2(tmp_path: Path, pipeline_root: Path, lora: bool) -> Path:
    """models/ with the session's sft and reward and a fresh 3-step stage 2 (LoRA or full)."""
    params = stage_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    if not lora:
        raw["train_safety"]["lora"] = None
    raw["merge"]["q"] = [0.0, 0.5, 1.0]
    params.write_text(yaml.safe_dump(raw))
    models = tmp_path / "models"
    for name in ("sft", "reward"):
        shutil.copytree(pipeline_root / "models" / name, models / name)
    preference.run("train_safety", params, pipeline_root / "data", models, tmp_path / "ckpt", QUIET)
    return models


@pytest.mark.parametrize("lora", [True, False], ids=["stacked-lora", "full-weights"])
def test_merged_policies_interpolate_the_two_stages(tmp_path: Path, pipeline_root: Path, lora: bool) -> None:
    models = _stage2(tmp_path, pipeline_root, lora)
    folders = merge.run(tmp_path / "params.yaml", models, models / "merged", QUIET)
    assert [f.name for f in folders] == ["q0", "q0_5", "q1"]
    stage1 = load_aligned_policy(models / "sft", models / "reward")
    stage2 = load_causal_lm(models / "safety")
    torch.testing.assert_close(logits(load_causal_lm(folders[0])), logits(stage1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_causal_lm(folders[2])), logits(stage2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(stage1), logits(stage2), atol=1e-4)  # the stages differ: the test can fail
    # By hand, not with the merge code: full weights, the float64 average of the two policies'
    # weights; stacked LoRA, W + dH + q dS with dS = B A alpha / r read from the adapter's files,
    # which is also that average (stage 2's saved weights are W + dH + dS).
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    average = {k: ((s1[k].double() + s2[k].double()) / 2).to(w.dtype) for k, w in s1.items()}
    expected = [average, folded(s1, models / "safety" / "adapter", 0.5)] if lora else [average]
    half = load_causal_lm(folders[1]).state_dict()
    assert half.keys() == s1.keys()
    for want in expected:
        for name, weight in want.items():
            torch.testing.assert_close(half[name], weight, rtol=1e-6, atol=1e-6, msg=name)
    record = json.loads((folders[1] / MERGE_RECORD).read_text())
    assert record["q"] == 0.5
    assert record["method"].startswith("stage-1 policy + q" if lora else "(1 - q)")
    assert (folders[1] / "tokenizer.json").exists()


def test_cli_merge_needs_stage2_first(tmp_path: Path, pipeline_root: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(pipeline_root / "models" / "reward", models / "reward")
    result = CliRunner().invoke(app, ["merge", "--models", str(models), "--out", str(models / "merged")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {models / 'safety'}: not found; run `rsa-pl train-safety` first"
    assert not (models / "merged").exists()


def test_cli_merge_rejects_a_bad_q(tmp_path: Path) -> None:
    params = stage_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["merge"]["q"] = [0.5, 1.5, 0.5]
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["check-params", "--params", str(params)])
    assert result.exit_code == 2
    assert "merge.q.1: input should be less than or equal to 1" in result.output
