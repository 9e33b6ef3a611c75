"""The preference stages learn: on a tiny separable preference set a few dozen steps reach a
held-out reward accuracy above 0.9 and lower the loss, for two architectures, LoRA and full."""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from rsa_pl.config import LoraParams
from rsa_pl.data.collate import PreferenceCollator
from rsa_pl.data.tokenize import IGNORE_INDEX
from rsa_pl.models import attach_lora, build_scratch_model
from rsa_pl.modules import PreferenceModule
from rsa_pl.params_file import load_params
from tests.helpers import scratch_model_params

ROOT = Path(__file__).resolve().parents[1]
VOCAB, PAD, BOS, EOS = 32, 0, 1, 2
PROMPT_TOKENS, GOOD, BAD = range(4, 12), range(12, 22), range(22, 32)


class _Vocabulary:
    """What build_scratch_model asks of a tokenizer."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def __len__(self) -> int:
        return VOCAB


def separable_pairs(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Chosen answers use only GOOD tokens, rejected ones only BAD tokens: a rule to learn."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = [BOS, *rng.choices(PROMPT_TOKENS, k=rng.randint(2, 5))]
        chosen = [*rng.choices(GOOD, k=rng.randint(2, 6)), EOS]
        rejected = [*rng.choices(BAD, k=rng.randint(2, 6)), EOS]
        ci, cl = prompt + chosen, [IGNORE_INDEX] * len(prompt) + chosen
        ri, rl = prompt + rejected, [IGNORE_INDEX] * len(prompt) + rejected
        pairs.append({"chosen_input_ids": ci, "chosen_labels": cl, "rejected_input_ids": ri, "rejected_labels": rl})
    return pairs


def evaluate(module: PreferenceModule, loader: DataLoader) -> tuple[float, float]:
    """Mean loss and reward accuracy over the loader."""
    losses, accuracies = [], []
    module.eval()
    with torch.no_grad():
        for batch in loader:
            loss, metrics = module.losses(batch)
            losses.append(loss)
            accuracies.append(metrics["rewards/accuracies"])
    return torch.cat(losses).mean().item(), torch.cat(accuracies).mean().item()


@pytest.mark.parametrize(
    ("architecture", "lora", "loss"),
    [
        ("llama", True, "rsa-cvar"),
        ("gpt2", False, "rsa-erm"),
        ("llama", True, "rsa-cvar_lower"),
        ("llama", False, "dpo"),
    ],
)
def test_a_few_dozen_steps_separate_a_separable_set(architecture: str, lora: bool, loss: str) -> None:
    L.seed_everything(0, verbose=False)
    params = load_params(ROOT / "params.yaml")
    stage = params.train_reward
    risk = None if loss == "dpo" else stage.risk.model_copy(update={"measure": loss.split("-")[1], "mu": 0.8})
    alpha = 0.0 if loss == "dpo" else 0.5
    section = stage.model_copy(update={"loss": loss.split("-")[0], "risk": risk, "alpha": alpha})
    train = stage.train.model_copy(update={"lr": 1e-2, "warmup_steps": 2, "max_steps": 40, "weight_decay": 0.0})
    model_params = scratch_model_params(architecture, 32)
    model = build_scratch_model(model_params, _Vocabulary())
    if lora:
        adapter = LoraParams(r=8, alpha=16.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
        policy, reference = attach_lora(model, adapter), None
    else:
        policy, reference = model, build_scratch_model(model_params, _Vocabulary())
        reference.load_state_dict(model.state_dict())
    module = PreferenceModule(policy, train, section.objective(), reference)
    collate = PreferenceCollator(PAD)
    train_loader = DataLoader(separable_pairs(320, seed=1), batch_size=8, shuffle=True, collate_fn=collate)
    held_out = DataLoader(separable_pairs(64, seed=2), batch_size=16, collate_fn=collate)

    loss_before, _ = evaluate(module, held_out)
    assert loss_before == pytest.approx(math.log(2.0), abs=1e-5)  # policy == reference at the start
    trainer = L.Trainer(max_steps=train.max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, train_dataloaders=train_loader)
    loss_after, accuracy = evaluate(module, held_out)
    assert accuracy > 0.9
    assert loss_after < loss_before - 0.05


MEASURE_MUS = {
    "kl": [1.0],
    "cvar": [0.05, 0.5, 0.95, 1.0],
    "erm": [0.5, 5.0],
    "cvar_radpo": [0.95],
    "cvar_lower": [0.05, 0.95, 1.0],
    "erm_lower": [0.5, 1.0],
}
ADAPTER = LoraParams(r=8, alpha=16.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])


def _fresh_lora_module(measure: str, mu: float, lr: float = 1e-2, max_steps: int = 1) -> PreferenceModule:
    """A tiny Llama with a fresh LoRA adapter (policy == reference), the stage's RSA objective."""
    L.seed_everything(0, verbose=False)
    stage = load_params(ROOT / "params.yaml").train_reward
    risk = stage.risk.model_copy(update={"measure": measure, "mu": mu})
    section = stage.model_copy(update={"loss": "tdpo" if measure == "kl" else "rsa", "risk": risk, "alpha": 0.5})
    train = stage.train.model_copy(update={"lr": lr, "warmup_steps": 0, "max_steps": max_steps, "weight_decay": 0.0})
    model = build_scratch_model(scratch_model_params("llama", 32), _Vocabulary())
    return PreferenceModule(attach_lora(model, ADAPTER), train, section.objective(), None)


def _first_step_gradient(module: PreferenceModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    module.model.train()
    module.losses(batch)[0].mean().backward()
    grads = [w.grad.flatten() for w in module.model.parameters() if w.requires_grad]
    return torch.cat(grads)


@pytest.mark.parametrize("measure", list(MEASURE_MUS))
def test_first_step_with_a_fresh_adapter_has_tdpos_gradient(measure: str) -> None:
    """A fresh adapter leaves the policy equal to its reference, so the drift ties at every
    position. There every measure, at every mu, must give TDPO's gradient (risk term: zero);
    the old CVaR boundary put the tie's whole weight on token 0 (pad) and pushed its logit."""
    batch = PreferenceCollator(PAD)(separable_pairs(8, seed=3))
    tdpo = _first_step_gradient(_fresh_lora_module("kl", 1.0), batch)
    assert tdpo.abs().max() > 0
    for mu in MEASURE_MUS[measure]:
        module = _fresh_lora_module(measure, mu)
        with torch.no_grad():  # the ties are exact: policy and reference logits are the same bits
            module.model.train()
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert torch.equal(logits, module.reference_logits(batch))
        grad = _first_step_gradient(module, batch)
        torch.testing.assert_close(grad, tdpo, rtol=1e-5, atol=1e-9, msg=f"{measure} mu={mu}")


def test_cvar_at_full_tail_trains_like_tdpo() -> None:
    """cvar at mu = 1 is KL: a few real AdamW steps of the Lightning module end where TDPO's do,
    to float noise (the boundary and tie share round differently from KL's plain mean)."""
    loader = DataLoader(separable_pairs(48, seed=4), batch_size=8, collate_fn=PreferenceCollator(PAD))
    params = {}
    for measure in ("kl", "cvar"):
        module = _fresh_lora_module(measure, 1.0, lr=1e-2, max_steps=6)
        trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu")  # fmt: skip
        trainer.fit(module, train_dataloaders=loader)
        params[measure] = torch.cat([w.detach().flatten() for w in module.model.parameters() if w.requires_grad])
    moved = (params["kl"] - _trainable(_fresh_lora_module("kl", 1.0))).abs().max()
    assert moved > 1e-2  # the steps did move the adapter
    torch.testing.assert_close(params["cvar"], params["kl"], rtol=1e-4, atol=1e-6)


def _trainable(module: PreferenceModule) -> torch.Tensor:
    return torch.cat([w.detach().flatten() for w in module.model.parameters() if w.requires_grad])
