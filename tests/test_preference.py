"""The two preference stages: exact references, the stage-2 start at ln 2, loadable artifacts."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file as safetensors_weights
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from rsa_pl.config import PreferenceStageParams
from rsa_pl.data.collate import PreferenceCollator
from rsa_pl.data.datamodule import TokenizedDataModule
from rsa_pl.models import attach_lora, load_causal_lm
from rsa_pl.modules import PreferenceModule
from rsa_pl.params_file import load_params
from rsa_pl.pipeline import preference
from rsa_pl.pipeline.cli import app
from tests.helpers import ROOT, one_batch, scratch_model_params, stage_params

QUIET = Console(quiet=True)


def test_stage1_adapter_loads_with_plain_peft(pipeline_root: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(str(pipeline_root / "models" / "sft"))
    policy = PeftModel.from_pretrained(base, str(pipeline_root / "models" / "reward"))
    assert policy.peft_config["default"].r == 8
    metrics = (pipeline_root / "models" / "reward" / "metrics.json").read_text()
    assert "val/rewards/accuracies" in metrics


def test_disabled_adapter_gives_the_base_models_logits(pipeline_root: Path) -> None:
    params = load_params(pipeline_root / "params.yaml")
    policy = attach_lora(load_causal_lm(pipeline_root / "models" / "sft"), params.train_reward.lora)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_" in name:
                weight.normal_()  # a trained-looking adapter, so that it changes the logits
    batch = one_batch(pipeline_root)
    module = PreferenceModule(policy, params.train_reward.train, params.train_reward.objective(), None)
    base_logits = load_causal_lm(pipeline_root / "models" / "sft")(
        batch["input_ids"], attention_mask=batch["attention_mask"]
    ).logits
    torch.testing.assert_close(module.reference_logits(batch), base_logits)
    assert not torch.allclose(policy(batch["input_ids"]).logits, base_logits)


def test_stage2_starts_at_ln2_with_zero_risk(pipeline_root: Path) -> None:
    """The stage-2 reference is the stage-1 policy exactly: at step 0 policy == reference."""
    params = load_params(pipeline_root / "params.yaml")
    start = preference._starting_policy(pipeline_root / "models", "reward")
    policy = attach_lora(start, params.train_safety.lora)
    module = PreferenceModule(policy, params.train_safety.train, params.train_safety.objective(), None)
    batch = one_batch(pipeline_root)
    losses, metrics = module.losses(batch)
    stage1 = PeftModel.from_pretrained(
        load_causal_lm(pipeline_root / "models" / "sft"), str(pipeline_root / "models" / "reward")
    )
    stage1_logits = stage1(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(module.reference_logits(batch), stage1_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2.0)), atol=1e-6, rtol=0)
    assert metrics["risk/chosen"].abs().max() < 1e-5
    assert metrics["risk/rejected"].abs().max() < 1e-5


def test_training_changes_every_adapter_weight_and_no_reference_weight(pipeline_root: Path) -> None:
    params = load_params(pipeline_root / "params.yaml")
    policy = attach_lora(load_causal_lm(pipeline_root / "models" / "sft"), params.train_reward.lora)
    before = {n: w.detach().clone() for n, w in policy.named_parameters()}
    tokenizer = AutoTokenizer.from_pretrained(str(pipeline_root / "data" / "tokenizer"))
    dm = TokenizedDataModule(
        pipeline_root / "data" / "helpful_pairs", 4, PreferenceCollator(tokenizer.pad_token_id), 0, False
    )
    module = PreferenceModule(policy, params.train_reward.train, params.train_reward.objective(), None)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu")  # fmt: skip
    trainer.fit(module, datamodule=dm)
    for name, weight in policy.named_parameters():
        changed = not torch.equal(weight.detach(), before[name])
        assert changed == ("lora_" in name), name


def source_logits(models: Path, previous: str | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of the model a stage starts from, loaded from disk by plain transformers and
    peft (not by the stage's loaders): SFT in stage 1; in stage 2 the stage-1 policy, a full model
    folder or SFT with the stage-1 adapter folded in."""
    if previous is None:
        source = AutoModelForCausalLM.from_pretrained(str(models / "sft"))
    elif (models / previous / "adapter_config.json").exists():
        sft = AutoModelForCausalLM.from_pretrained(str(models / "sft"))
        source = PeftModel.from_pretrained(sft, str(models / previous)).merge_and_unload()
    else:
        source = AutoModelForCausalLM.from_pretrained(str(models / previous))
    with torch.no_grad():
        return source.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def assert_reference_stays_the_source(section: PreferenceStageParams, models: Path, previous: str | None,
                                      data: Path) -> None:  # fmt: skip
    """Build policy and reference as the stage does (policy_and_reference), train a few Lightning
    steps, and check that the policy moved while the reference's logits are still the source
    model's, loaded independently from disk (a noisy, shared or trainable copy fails this)."""
    policy, reference, adapters = preference.policy_and_reference(section, models, previous)
    module = PreferenceModule(policy, section.train, section.objective(), reference, adapters)
    batch = one_batch(data.parent, "helpful_pairs")
    expected = source_logits(models, previous, batch)
    torch.testing.assert_close(module.reference_logits(batch), expected, rtol=0, atol=1e-6)  # step 0
    before = {n: w.detach().clone() for n, w in policy.named_parameters() if w.requires_grad}
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    dm = TokenizedDataModule(data / "helpful_pairs", 4, PreferenceCollator(tokenizer.pad_token_id), 0, False)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, accelerator="cpu", enable_model_summary=False)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    moved = [n for n, w in policy.named_parameters() if n in before and not torch.equal(w.detach(), before[n])]
    assert moved, "the policy did not train"
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        assert not torch.allclose(policy.eval()(**inputs).logits, expected)
    torch.testing.assert_close(module.reference_logits(batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full-weights"])
@pytest.mark.parametrize("stage", ["train_reward", "train_safety"])
def test_the_reference_stays_the_model_the_stage_started_from(
    tmp_path: Path, pipeline_root: Path, stage: str, lora: bool
) -> None:
    """Stage 1 (from SFT) and stage 2 (from the LoRA stage-1 policy), LoRA (reference: the adapter
    disabled) and full weights (reference: a frozen copy), after real optimizer steps."""
    section = getattr(load_params(stage_params(tmp_path, lora=lora)), stage)
    previous = preference.STAGES[stage][1]
    assert_reference_stays_the_source(section, pipeline_root / "models", previous, pipeline_root / "data")


def test_a_reference_given_to_the_module_is_frozen(tmp_path: Path, pipeline_root: Path) -> None:
    """PreferenceModule freezes the reference it is given (a library user's model comes in
    trainable), so nothing, an optimizer over all parameters included, can move it."""
    section = load_params(stage_params(tmp_path, lora=False)).train_reward
    policy, reference = (load_causal_lm(pipeline_root / "models" / "sft") for _ in range(2))
    assert all(w.requires_grad for w in reference.parameters())
    module = PreferenceModule(policy, section.train, section.objective(), reference, None)
    assert not any(w.requires_grad for w in module.reference.parameters())
    assert all(w.requires_grad for w in module.model.parameters())


@pytest.mark.parametrize("lora", [True, False], ids=["adapter-off", "frozen-copy"])
def test_the_reference_forward_runs_in_eval_mode_without_dropout(lora: bool) -> None:
    """A model with dropout (GPT-2's default is 0.1; here 0.5): the reference's logits are its
    eval-mode logits, the same on every call while the module trains, and the policy is left
    in the mode it was in."""
    from transformers import GPT2Config, GPT2LMHeadModel

    section = load_params(ROOT / "params.yaml").train_reward
    config = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.5,
                        embd_pdrop=0.5, attn_pdrop=0.5)  # fmt: skip
    torch.manual_seed(0)
    base = GPT2LMHeadModel(config)
    batch = {"input_ids": torch.randint(0, 50, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    with torch.no_grad():
        expected = copy.deepcopy(base).eval()(**batch).logits
    if lora:
        targets = section.lora.model_copy(update={"target_modules": ["c_attn", "c_proj"]})
        module = PreferenceModule(attach_lora(base, targets), section.train, section.objective(), None)
    else:
        module = PreferenceModule(copy.deepcopy(base), section.train, section.objective(), base)
    module.train()
    for _ in range(2):
        torch.testing.assert_close(module.reference_logits(batch), expected, rtol=0, atol=1e-6)
    assert module.model.training


def test_full_fine_tuning_uses_a_frozen_copy(tmp_path: Path, pipeline_root: Path) -> None:
    """A full-weights stage 1 changes every weight; stage 2 from it (full weights or LoRA) keeps
    its reference equal to that stage-1 model through training."""
    params = stage_params(tmp_path, lora=False)
    models = tmp_path / "models"
    (models / "sft").parent.mkdir(parents=True)
    shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
    metrics = preference.run("train_reward", params, pipeline_root / "data", models, tmp_path / "ckpt", QUIET)
    assert metrics["train/steps"] == 3
    trained = AutoModelForCausalLM.from_pretrained(str(models / "reward"))
    base = AutoModelForCausalLM.from_pretrained(str(models / "sft"))
    differs = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters(), strict=True)]
    assert all(differs)
    full = load_params(params).train_safety
    (tmp_path / "lora").mkdir()
    with_lora = load_params(stage_params(tmp_path / "lora")).train_safety
    for section in (full, with_lora):
        assert_reference_stays_the_source(section, models, "reward", pipeline_root / "data")


def test_cli_runs_stage2_and_saves_full_weights_and_its_adapter(tmp_path: Path, pipeline_root: Path) -> None:
    params, models = pipeline_root / "params.yaml", tmp_path / "models"
    for name in ("sft", "reward"):  # a copy: the session's models stay what every test expects
        shutil.copytree(pipeline_root / "models" / name, models / name)
    result = CliRunner().invoke(
        app,
        ["train-safety", "--params", str(params), "--data", str(pipeline_root / "data"),
         "--models", str(models), "--checkpoints", str(tmp_path / "ckpt"),
         "--metrics", str(tmp_path / "metrics" / "train_safety.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not (pipeline_root / "models" / "safety").exists()
    safety = models / "safety"
    model = AutoModelForCausalLM.from_pretrained(str(safety))
    assert (safety / "adapter" / "adapter_config.json").exists()
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
    assert (tmp_path / "metrics" / "train_safety.json").exists()


def test_cli_says_which_stage_to_run_first(tmp_path: Path, pipeline_root: Path) -> None:
    result = CliRunner().invoke(
        app, ["train-safety", "--data", str(pipeline_root / "data"), "--models", str(tmp_path / "models")]
    )
    assert result.exit_code == 2
    assert "run `rsa-pl train-reward` first" in result.output


class _KilledError(Exception):
    """A stage killed mid-run."""


class _KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise _KilledError


@pytest.mark.slow
def test_a_killed_stage_resumes_to_the_uninterrupted_result(
    tmp_path: Path, pipeline_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after step 5 of 32 (last checkpoint: step 3, mid-epoch) and after step 29 (checkpoint
    at 27, 2 steps into the second epoch of 25 batches), resumed each time: the same final
    metrics and weights as one run. LoRA dropout is on, so the RNG state has to be restored
    as well as the data order."""
    params = stage_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["train_reward"]["lora"]["dropout"] = 0.1
    raw["train_reward"]["train"].update(max_steps=32, max_epochs=5, checkpoint_every_n_steps=3,
                                        val_every_n_steps=4, warmup_steps=2)  # fmt: skip
    params.write_text(yaml.safe_dump(raw))
    data = pipeline_root / "data"

    def fresh_models(name: str) -> Path:
        models = tmp_path / name
        shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
        return models

    whole = fresh_models("whole")
    expected = preference.run("train_reward", params, data, whole, tmp_path / "ckpt-whole", QUIET)
    assert expected["train/steps"] == 32

    killed, ckpt = fresh_models("killed"), tmp_path / "ckpt-killed"
    build = preference.build_trainer
    for step in (5, 29):
        monkeypatch.setattr(preference, "build_trainer", lambda *a, s=step, **k: build(*a, **k, extra=[_KillAt(s)]))
        with pytest.raises(_KilledError):
            preference.run("train_reward", params, data, killed, ckpt, QUIET)
    monkeypatch.setattr(preference, "build_trainer", build)
    console = Console(record=True, width=400)
    resumed = preference.run("train_reward", params, data, killed, ckpt, console)
    assert "resuming from" in console.export_text()

    timing = {"time/train_s"}
    assert {k: v for k, v in resumed.items() if k not in timing} == pytest.approx(
        {k: v for k, v in expected.items() if k not in timing}, rel=1e-6, abs=1e-7
    )
    a = safetensors_weights(whole / "reward" / "adapter_model.safetensors")
    b = safetensors_weights(killed / "reward" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path: Path, pipeline_root: Path) -> None:
    """`rsa-pl train-reward` with strategy ddp on 2 gloo processes of batch 2 trains like one
    process of batch 4: the same final validation metrics, within float32 reduction order."""

    def train(name: str, **settings: object) -> dict[str, float]:
        folder = tmp_path / name
        folder.mkdir()
        params = stage_params(folder)
        raw = yaml.safe_load(params.read_text())
        raw["train_reward"]["train"].update(max_steps=6, accelerator="cpu", **settings)
        params.write_text(yaml.safe_dump(raw))
        shutil.copytree(pipeline_root / "models" / "sft", folder / "models" / "sft")
        command = [sys.executable, "-m", "rsa_pl.pipeline.cli", "train-reward", "--params", str(params),
                   "--data", str(pipeline_root / "data"), "--models", str(folder / "models"),
                   "--checkpoints", str(folder / "ckpt"), "--metrics", str(folder / "live")]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if settings["devices"] == 2:
            assert "Starting with 2 processes" in done.stdout + done.stderr
        return json.loads((folder / "models" / "reward" / "metrics.json").read_text())

    one = train("one", batch_size=4, devices=1, strategy="auto")
    two = train("two", batch_size=2, devices=2, strategy="ddp")
    assert one["train/steps"] == two["train/steps"] == 6
    for key in ("val/loss", "val/rewards/margins", "val/logps/chosen", "val/risk/rejected"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-5), key
    assert one["val/loss"] != pytest.approx(math.log(2.0), abs=1e-3)  # it did train


def test_two_runs_with_the_same_seed_train_the_same_adapter(tmp_path: Path, pipeline_root: Path) -> None:
    params = stage_params(tmp_path)
    adapters = []
    for run in ("a", "b"):
        models = tmp_path / run
        shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
        preference.run("train_reward", params, pipeline_root / "data", models, tmp_path / f"ckpt-{run}", QUIET)
        adapters.append((models / "reward" / "adapter_model.safetensors").read_bytes())
    assert adapters[0] == adapters[1]


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_logits_only_from_the_first_response_position_change_nothing(
    tmp_path: Path, architecture: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The LM head skips prompt positions (logits_window): losses, metrics and gradients equal
    those from every position's logits, for prompts of different lengths in one batch."""
    from rsa_pl import modules
    from rsa_pl.data.tokenize import IGNORE_INDEX
    from rsa_pl.models import build_scratch_model

    class Vocabulary:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self) -> int:
            return 50

    params = load_params(ROOT / "params.yaml")
    model_params = scratch_model_params(architecture, 64)
    torch.manual_seed(0)
    lora = params.train_reward.lora
    if architecture == "gpt2":
        lora = lora.model_copy(update={"target_modules": ["c_attn", "c_proj", "c_fc"]})
    policy = attach_lora(build_scratch_model(model_params, Vocabulary()), lora)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.1)  # policy and reference differ
    prompts = [9, 5, 7, 12, 9, 5, 7, 12]  # 4 pairs, [chosen; rejected], right padded to 20
    rows, labels = [], []
    for i, length in enumerate(prompts):
        response = torch.randint(3, 50, (4 + i % 3,)).tolist()
        ids = torch.randint(3, 50, (length,)).tolist() + response
        rows.append(ids + [0] * (20 - len(ids)))
        labels.append([IGNORE_INDEX] * length + response + [IGNORE_INDEX] * (20 - len(ids)))
    real = (torch.tensor(labels) != IGNORE_INDEX) | (torch.arange(20) < torch.tensor(prompts)[:, None])
    batch = {"input_ids": torch.tensor(rows), "labels": torch.tensor(labels), "attention_mask": real.long()}
    assert modules.logits_window(batch["labels"]) == 20 - 4  # from the shortest prompt's last token on
    module = PreferenceModule(policy, params.train_reward.train, params.train_reward.objective(), None)

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        policy.zero_grad()
        losses, metrics = module.losses(batch)
        losses.sum().backward()
        return losses, metrics, [w.grad.clone() for w in policy.parameters() if w.requires_grad]

    windowed = run()
    monkeypatch.setattr(modules, "logits_window", lambda labels: labels.shape[1])  # every position
    everything = run()
    torch.testing.assert_close(windowed[0], everything[0], rtol=1e-6, atol=1e-7)
    for name in windowed[1]:
        torch.testing.assert_close(windowed[1][name], everything[1][name], rtol=1e-5, atol=1e-6)
    for a, b in zip(windowed[2], everything[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_the_pairs_param_runs_the_reverse_order(tmp_path: Path, pipeline_root: Path) -> None:
    """train_reward with pairs: safety trains on data/safety_pairs (safety first): its result equals
    a helpful-pairs run on data whose helpful_pairs folder holds the safety pairs, and differs
    from the default run."""
    params = stage_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["train_reward"]["pairs"] = "safety"
    reverse = tmp_path / "reverse.yaml"
    reverse.write_text(yaml.safe_dump(raw))
    swapped = tmp_path / "swapped-data"
    swapped.mkdir()
    for item in (pipeline_root / "data").iterdir():
        source = pipeline_root / "data" / ("safety_pairs" if item.name == "helpful_pairs" else item.name)
        (swapped / item.name).symlink_to(source, target_is_directory=source.is_dir())
    results = {}
    for run, (path, data) in {
        "default": (params, pipeline_root / "data"),
        "reverse": (reverse, pipeline_root / "data"),
        "swapped": (params, swapped),
    }.items():
        models = tmp_path / run
        shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
        metrics = preference.run("train_reward", path, data, models, tmp_path / f"ckpt-{run}", QUIET)
        results[run] = {k: v for k, v in metrics.items() if k.startswith("val/")}
    assert results["reverse"] == results["swapped"]
    assert results["reverse"] != results["default"]
