"""QLoRA on the CPU backend of bitsandbytes: 4-bit NF4 base, exact references in both stages,
the stage-1 adapter frozen under the stage-2 one, and a one-line error without a backend."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import yaml
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from pipeline import preference
from pipeline.cli import app
from rsa_pl.config import QuantizationParams, load_params
from rsa_pl.models import FROZEN_ADAPTER, load_causal_lm, load_quantized
from rsa_pl.modules import PreferenceModule
from tests.test_preference import one_batch, stage_params

QUIET = Console(quiet=True)
NF4 = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def qlora_params(tmp_path: Path, stages: tuple[str, ...]) -> Path:
    path = stage_params(tmp_path)
    raw = yaml.safe_load(path.read_text())
    for stage in stages:
        raw[stage]["quantization"] = dict(NF4)
    raw["train_reward"]["train"]["gradient_checkpointing"] = True  # the k-bit + checkpointing path too
    path.write_text(yaml.safe_dump(raw))
    return path


def four_bit(path: Path) -> torch.nn.Module:
    return load_quantized(path, QuantizationParams(**NF4), "cpu", gradient_checkpointing=False)


@pytest.fixture(scope="module")
def qlora_root(tmp_path_factory: pytest.TempPathFactory, pipeline_root: Path) -> Path:
    """Both stages' models with a 4-bit stage 1 on the session's SFT model."""
    root = tmp_path_factory.mktemp("qlora")
    params = qlora_params(root, ("train_reward", "train_safety"))
    shutil.copytree(pipeline_root / "models" / "sft", root / "models" / "sft")
    preference.run("train_reward", params, pipeline_root / "data", root / "models", root / "ckpt" / "r", QUIET)
    return root


def test_the_base_really_is_4_bit(qlora_root: Path) -> None:
    model = four_bit(qlora_root / "models" / "sft")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_type == "nf4" for m in layers)


def test_a_reference_forward_leaves_every_4_bit_layer_trainable(qlora_root: Path) -> None:
    """bitsandbytes repacks a 4-bit layer for CPU inference at its first eval-mode forward
    without autograd (on CPUs with avx512_bf16), after which backprop skips it: the reference
    forward must not trigger that, on any CPU."""
    model = four_bit(qlora_root / "models" / "sft")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    ids = torch.tensor([[1, 5, 6, 7]])
    model.eval()
    with torch.inference_mode():
        model(input_ids=ids)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    model.train()
    probe = layers[0].weight.quant_state.shape[1]
    x = torch.randn(2, probe, requires_grad=True)
    layers[0](x).sum().backward()
    assert x.grad is not None
    assert x.grad.abs().sum() > 0  # gradient flows through the 4-bit matmul


def test_4bit_stage1_reference_is_the_4bit_base(qlora_root: Path, pipeline_root: Path) -> None:
    params = load_params(qlora_root / "params.yaml")
    section = params.train_reward
    policy, reference, adapters = preference.policy_and_reference(section, qlora_root / "models", None)
    assert reference is None
    assert adapters is None
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_()  # a trained-looking adapter
    module = PreferenceModule(policy, section.train, section.objective(), reference, adapters)
    batch = one_batch(pipeline_root, "helpful_pairs")
    base = four_bit(qlora_root / "models" / "sft")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_logits = base(**inputs).logits
        assert not torch.allclose(policy(**inputs).logits, base_logits)
    torch.testing.assert_close(module.reference_logits(batch), base_logits, rtol=0, atol=0)


def test_4bit_stage1_saves_an_adapter_for_the_float_base(qlora_root: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(str(qlora_root / "models" / "sft"))
    policy = PeftModel.from_pretrained(base, str(qlora_root / "models" / "reward"))
    assert any("lora_A" in name for name, _ in policy.named_parameters())
    metrics = (qlora_root / "models" / "reward" / "metrics.json").read_text()
    assert '"train/steps": 3.0' in metrics


def test_4bit_stage2_keeps_stage1_frozen_under_the_new_adapter(qlora_root: Path, pipeline_root: Path) -> None:
    """At step 0 of stage 2 the loss is ln 2 with zero risk; the reference is the 4-bit base
    with the stage-1 adapter exactly; a few steps train the new adapter and nothing else."""
    params = load_params(qlora_root / "params.yaml")
    section = params.train_safety
    policy, reference, adapters = preference.policy_and_reference(section, qlora_root / "models", "reward")
    assert adapters == [FROZEN_ADAPTER]
    assert reference is None
    module = PreferenceModule(policy, section.train, section.objective(), reference, adapters)
    batch = one_batch(pipeline_root)
    losses, metrics = module.losses(batch)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2.0)), atol=1e-6, rtol=0)
    assert metrics["risk/chosen"].abs().max() < 1e-5
    assert metrics["risk/rejected"].abs().max() < 1e-5

    stage1 = PeftModel.from_pretrained(four_bit(qlora_root / "models" / "sft"), str(qlora_root / "models" / "reward"))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        stage1_logits = stage1.eval()(**inputs).logits
    trainable = {n for n, w in policy.named_parameters() if w.requires_grad}
    assert trainable
    assert all(".default." in n for n in trainable)
    before = {n: w.detach().clone() for n, w in policy.named_parameters()}
    optimizer = torch.optim.AdamW([w for w in policy.parameters() if w.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        module.losses(batch)[0].mean().backward()
        optimizer.step()
    for name, weight in policy.named_parameters():
        changed = not torch.equal(weight.detach(), before[name])
        assert changed == (name in trainable), name
    torch.testing.assert_close(module.reference_logits(batch), stage1_logits, rtol=0, atol=0)


def test_4bit_stage2_cli_writes_loadable_weights_and_adapter(qlora_root: Path, pipeline_root: Path) -> None:
    models = qlora_root / "models"
    result = CliRunner().invoke(
        app,
        ["train-safety", "--params", str(qlora_root / "params.yaml"), "--data", str(pipeline_root / "data"),
         "--models", str(models), "--checkpoints", str(qlora_root / "ckpt" / "s"), "--metrics",
         str(qlora_root / "metrics.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(str(models / "safety"))
    assert all(w.dtype == torch.float32 for w in merged.parameters())
    float_stage1 = PeftModel.from_pretrained(load_causal_lm(models / "sft"), str(models / "reward")).merge_and_unload()
    expected = PeftModel.from_pretrained(float_stage1, str(models / "safety" / "adapter")).merge_and_unload()
    for (name, a), (_, b) in zip(merged.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_no_usable_backend_is_one_line_before_loading(
    tmp_path: Path, pipeline_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no kernel registered for device cpu\nsecond line of a long traceback")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", unavailable)
    loaded: list[object] = []
    monkeypatch.setattr(preference, "load_quantized", lambda *a, **k: loaded.append(a))
    params = qlora_params(tmp_path, ("train_reward",))
    result = CliRunner().invoke(
        app,
        ["train-reward", "--params", str(params), "--data", str(pipeline_root / "data"),
         "--models", str(pipeline_root / "models"), "--checkpoints", str(tmp_path / "ckpt")],
    )  # fmt: skip
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "bitsandbytes cannot do 4-bit nf4 on cpu (no kernel registered for device cpu)" in lines[0]
    assert not loaded


def test_quantization_without_lora_is_a_params_error(tmp_path: Path) -> None:
    path = qlora_params(tmp_path, ("train_reward",))
    raw = yaml.safe_load(path.read_text())
    raw["train_reward"]["lora"] = None
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match=r"train_reward\.quantization: needs lora"):
        load_params(path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_bf16_mixed_on_cuda(tmp_path: Path, pipeline_root: Path) -> None:
    """The GPU path users run: 4-bit NF4 with bfloat16 compute under bf16-mixed precision."""
    params = qlora_params(tmp_path, ("train_reward",))
    raw = yaml.safe_load(params.read_text())
    raw["train_reward"]["quantization"]["compute_dtype"] = "bfloat16"
    raw["train_reward"]["train"].update(accelerator="gpu", precision="bf16-mixed", gradient_checkpointing=True)
    params.write_text(yaml.safe_dump(raw))
    shutil.copytree(pipeline_root / "models" / "sft", tmp_path / "models" / "sft")
    metrics = preference.run("train_reward", params, pipeline_root / "data", tmp_path / "models", tmp_path / "c", QUIET)
    assert metrics["train/steps"] == 3
    assert math.isfinite(metrics["val/loss"])
    assert (tmp_path / "models" / "reward" / "adapter_config.json").exists()
