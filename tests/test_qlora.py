"""QLoRA on the CPU backend of bitsandbytes (CUDA with -m cuda): 4-bit NF4 base, every adapter
trains (no CPU inference repack), exact references in both stages, the stage-1 adapter frozen
under the stage-2 one, and a one-line error without a backend."""

from __future__ import annotations

import importlib
import math
import re
import shutil
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import lightning as L
import pytest
import torch
import yaml
from bitsandbytes.functional import has_avx512bf16
from lightning.pytorch.callbacks import Callback
from peft import PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from rsa_pl.config import PreferenceStageParams, QuantizationParams
from rsa_pl.data.collate import PreferenceCollator
from rsa_pl.data.datamodule import TokenizedDataModule
from rsa_pl.models import FROZEN_ADAPTER, build_scratch_model, load_causal_lm, load_quantized, load_tokenizer
from rsa_pl.modules import PreferenceModule
from rsa_pl.params_file import load_params
from rsa_pl.pipeline import preference
from rsa_pl.pipeline.cli import app
from rsa_pl.training import build_trainer
from tests.helpers import folded, one_batch, stage_params

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


ON_GPU = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def wide_root(tmp_path_factory: pytest.TempPathFactory, pipeline_root: Path) -> Path:
    """A 2-layer, 64-wide Llama built from a config as models/sft, with QLoRA stage params.
    The session's model is 32 wide, below the 64-wide quantization block: bitsandbytes' CPU
    repack fails loudly on it, while on this one it succeeds and silently breaks backprop."""
    root = tmp_path_factory.mktemp("qlora_wide")
    params = qlora_params(root, ("train_reward",))
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2}
    base = load_params(params).sft.model.model_copy(update=sizes)
    torch.manual_seed(0)
    model = build_scratch_model(base, load_tokenizer(pipeline_root / "data" / "tokenizer"))
    model.save_pretrained(str(root / "models" / "sft"))
    return root


def wide_stage(root: Path, device: str, **train: Any) -> PreferenceStageParams:
    section = load_params(root / "params.yaml").train_reward
    accelerator = {"cpu": "cpu", "cuda": "gpu"}[device]
    return section.model_copy(update={"train": section.train.model_copy(update={"accelerator": accelerator, **train})})


def wide_module(root: Path, device: str) -> PreferenceModule:
    """Stage 1 under QLoRA as the stage builds it: 4-bit base + new adapter, reference = adapter off."""
    section = wide_stage(root, device)
    policy, reference, adapters = preference.policy_and_reference(section, root / "models", None)
    assert reference is None
    assert adapters is None
    return PreferenceModule(policy, section.train, section.objective(), reference, adapters)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LoRA-wrapped 4-bit layers (peft's bnb Linear4bit: base_layer is bitsandbytes')."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "base_layer", None), bnb.nn.Linear4bit)]
    assert len(layers) == 2 * len(TARGETS)
    return layers


def repacked(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The 4-bit layers bitsandbytes has repacked for its CPU inference kernel."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return [m for m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]


class _Steps(Callback):
    """Records the order of reference forwards and optimizer steps, and the LoRA B gradients
    at the first optimizer step."""

    def __init__(self, module: PreferenceModule) -> None:
        self.events: list[str] = []
        self.lora_b: dict[str, torch.Tensor | None] = {}
        forward = module.reference_logits

        def reference_logits(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.events.append("reference")
            return forward(*args, **kwargs)

        module.reference_logits = reference_logits

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.events.append("step")
        if not self.lora_b:
            weights = pl_module.model.named_parameters()
            self.lora_b = {n: None if w.grad is None else w.grad.detach().clone() for n, w in weights if "lora_B" in n}


@pytest.mark.parametrize("device", DEVICES)
def test_one_qlora_step_gives_every_lora_b_a_gradient(
    wide_root: Path, pipeline_root: Path, tmp_path: Path, device: str
) -> None:
    """The first optimizer step of a real Trainer (the sanity-check validation, then the
    reference forward, the policy forward and backward, as the stage runs them) reaches the
    LoRA B matrix (zero at init: its gradient is the one that must not vanish) of every
    target module in every layer; bitsandbytes' CPU repack used to leave only o_proj and
    down_proj with one. No layer ends up repacked."""
    section = wide_stage(wide_root, device, max_steps=1)
    policy, reference, adapters = preference.policy_and_reference(section, wide_root / "models", None)
    module = PreferenceModule(policy, section.train, section.objective(), reference, adapters)
    steps = _Steps(module)
    trainer = build_trainer(section.train, tmp_path / "logs", tmp_path / "ckpt", extra=[steps])
    data = pipeline_root / "data"
    collate = PreferenceCollator(load_tokenizer(data / "tokenizer").pad_token_id)
    datamodule = TokenizedDataModule(data / "helpful_pairs", section.train.batch_size, collate, 0, False)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.num_sanity_val_steps > 0
    assert steps.events[-2:] == ["reference", "step"]  # the step's own reference forward came first
    assert steps.events.count("reference") > 1  # after the sanity check's, which ran in eval mode
    found = {re.search(r"layers\.(\d+)\.\w+\.(\w+)\.lora_B", n).groups() for n in steps.lora_b}
    assert found == {(str(i), t) for i in range(2) for t in TARGETS}
    assert [n for n, grad in steps.lora_b.items() if grad is None or not grad.any()] == []
    assert not repacked(policy)


@pytest.mark.parametrize("device", DEVICES)
def test_at_step_0_policy_and_reference_logits_stay_equal(wide_root: Path, pipeline_root: Path, device: str) -> None:
    """With the new adapter at zero the policy is its reference, exactly, before and after a
    reference forward (eval mode, no autograd): that forward must not move either to other
    numerics (the CPU repack computed in bfloat16)."""
    module = wide_module(wide_root, device)
    batch = {k: v.to(device) for k, v in one_batch(pipeline_root, "helpful_pairs").items()}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    module.model.train()
    first = module.model(**inputs).logits.detach()  # as the training step computes them
    reference = module.reference_logits(batch)
    again = module.model(**inputs).logits.detach()
    exact = {"rtol": 0, "atol": 0} if device == "cpu" else {}  # GPU kernels may differ by mode: float tolerance
    torch.testing.assert_close(reference, first, **exact)
    torch.testing.assert_close(again, first, **exact)
    assert not repacked(module.model)


def test_a_4_bit_layer_still_backprops_after_a_reference_forward(wide_root: Path) -> None:
    """One 4-bit layer with its adapter: after an eval-mode forward under inference_mode (what
    the reference forward does to it) it is not repacked and its gradients, to the adapter and
    to the input, are exactly those it had before."""
    module = wide_module(wide_root, "cpu")
    layer = lora_layers(module.model)[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # else the gradient to A and through B is zero
    torch.manual_seed(1)
    x = torch.randn(2, 3, layer.base_layer.in_features)

    def gradients() -> list[torch.Tensor]:
        layer.train()
        leaf = x.clone().requires_grad_(True)
        layer(leaf).square().sum().backward()
        adapter = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        grads = [leaf.grad, *(w.grad for w in adapter)]
        for w in adapter:
            w.grad = None
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        return grads

    before = gradients()
    layer.eval()
    with torch.inference_mode():
        layer(x)
    assert not repacked(layer)
    for grad, expected in zip(gradients(), before, strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_the_reference_forward_never_reaches_the_repack(wide_root: Path, pipeline_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """On every CPU: the repack is called from Linear4bit.forward exactly when the layer's
    support_avx512bf16_for_cpu switch is on (bitsandbytes' default on avx512_bf16 CPUs) and the
    reference forward runs; load_quantized's layers have it off and never get there. Fails if
    bitsandbytes renames the switch or the repack, or stops deciding the repack by the switch."""
    calls: list[object] = []

    def recorded(weight: torch.Tensor, state: object, *args: object, **kwargs: object) -> tuple[torch.Tensor, object]:
        calls.append(state)
        return weight, state  # the layer stays as it is, on any CPU

    monkeypatch.setattr(importlib.import_module("bitsandbytes.nn.modules"), "_convert_weight_packed_for_cpu", recorded)
    module = wide_module(wide_root, "cpu")
    batch = one_batch(pipeline_root, "helpful_pairs")
    module.reference_logits(batch)
    assert calls == []
    layers = [m.base_layer for m in lora_layers(module.model)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # bitsandbytes' own default on avx512_bf16 CPUs
    module.reference_logits(batch)
    assert len(calls) == len(layers)


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes repacks only on CPUs with avx512_bf16")
def test_without_the_switch_bitsandbytes_repacks_a_layer_that_no_longer_backprops(wide_root: Path) -> None:
    """What load_quantized prevents, shown with bitsandbytes' default switch on this CPU: one
    eval-mode forward under inference_mode repacks the layer, after which backprop cannot pass
    it (torch warns). If this fails, bitsandbytes changed: recheck load_quantized's switch."""
    module = wide_module(wide_root, "cpu")
    layer = lora_layers(module.model)[0].base_layer
    layer.support_avx512bf16_for_cpu = True
    x = torch.randn(2, 3, layer.in_features)
    layer.eval()
    with torch.inference_mode():
        layer(x)
    assert repacked(layer) == [layer]
    layer.train()
    leaf = x.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        layer(leaf).sum().backward()
    assert leaf.grad is None or not leaf.grad.any()


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
    optimizer = torch.optim.AdamW([w for w in policy.parameters() if w.requires_grad], lr=1e-2)
    for _ in range(2):  # and real steps, each after its reference forward, as in training
        optimizer.zero_grad()
        module.losses(batch)[0].mean().backward()
        optimizer.step()
    base = four_bit(qlora_root / "models" / "sft")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        base_logits = base(**inputs).logits
        assert not torch.allclose(policy(**inputs).logits, base_logits)
    torch.testing.assert_close(module.reference_logits(batch), base_logits, rtol=0, atol=0)


def test_4bit_stage2_after_a_full_weights_stage1_starts_from_it_in_4_bits(tmp_path: Path, pipeline_root: Path) -> None:
    """A full-weights stage 1 (a model folder, not an adapter) under a QLoRA stage 2: the stage-1
    model itself is loaded in 4 bits with a new adapter, and the reference (that adapter off)
    stays exactly that 4-bit model through real steps."""
    models = tmp_path / "models"
    shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
    stage1 = AutoModelForCausalLM.from_pretrained(str(models / "sft"))
    with torch.no_grad():
        for weight in stage1.parameters():
            weight.add_(0.05 * torch.randn_like(weight))  # a stage 1 that moved every weight
    stage1.save_pretrained(str(models / "reward"))
    section = load_params(qlora_params(tmp_path, ("train_safety",))).train_safety
    policy, reference, adapters = preference.policy_and_reference(section, models, "reward")
    assert reference is None
    assert adapters is None
    module = PreferenceModule(policy, section.train, section.objective(), reference, adapters)
    batch = one_batch(pipeline_root)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = four_bit(models / "reward").eval()(**inputs).logits
        assert not torch.allclose(expected, four_bit(models / "sft").eval()(**inputs).logits)
    torch.testing.assert_close(module.reference_logits(batch), expected, rtol=0, atol=0)
    before = {n: w.detach().clone() for n, w in policy.named_parameters() if w.requires_grad}
    optimizer = torch.optim.AdamW([w for w in policy.parameters() if w.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        module.losses(batch)[0].mean().backward()
        optimizer.step()
    assert any(not torch.equal(w.detach(), before[n]) for n, w in policy.named_parameters() if n in before)
    torch.testing.assert_close(module.reference_logits(batch), expected, rtol=0, atol=0)


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
    # by hand from the adapters' files (B A alpha / r), not with peft's merge that the code uses
    sft = load_causal_lm(models / "sft").state_dict()
    expected = folded(folded(sft, models / "reward"), models / "safety" / "adapter")
    got = merged.state_dict()
    assert got.keys() == expected.keys()
    assert any(not torch.equal(expected[k], sft[k]) for k in sft)
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-6, atol=1e-6, msg=name)


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
