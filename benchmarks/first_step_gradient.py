"""The first step of a stage, where a fresh LoRA adapter leaves the policy equal to its reference:
each measure's gradient against TDPO's (measure kl, the same loss with the plain KL).

At policy == reference the drift Z is 0 at every position (all atoms tie), and every measure's
gradient must be KL's (docs/method.md, "Ties and gradients"). This prints, for each measure and
mu, the cosine and norm ratio of the parameter gradient to TDPO's, and how hard the gradient
pushes the pad token's logit at rejected response positions, as a multiple of TDPO's push.
A tiny Llama from params.yaml's sft.model (random weights), or a trained model (--model, e.g.
the default run's models/sft), with train_reward's LoRA and objective, on random token pairs.

    python benchmarks/first_step_gradient.py
    python benchmarks/first_step_gradient.py --model models/sft
    PYTHONPATH=<checkout of another commit> python benchmarks/first_step_gradient.py   # compare

Prints a Markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rsa_pl.losses import preference_loss_from_logits
from rsa_pl.models import attach_lora, build_scratch_model, load_causal_lm
from rsa_pl.modules import PreferenceModule, next_token_targets
from rsa_pl.params_file import load_params
from rsa_pl.risk import RISK_MEASURES

ROOT = Path(__file__).resolve().parents[1]
MUS = {"kl": [1.0], "cvar": [0.5, 0.95, 1.0], "erm": [1.0, 5.0], "cvar_radpo": [0.95], "cvar_lower": [0.95, 1.0]}
MUS["erm_lower"] = [0.5, 1.0]


class _Vocabulary:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def _batch(pairs: int, vocab: int, prompt: int, response: int, seed: int) -> dict[str, torch.Tensor]:
    """[chosen; rejected] rows of random tokens: a prompt (labels -100), then a response."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2 * pairs, prompt + response), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _gradients(module: PreferenceModule, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's gradient over the trainable parameters (flat) and over the policy's logits."""
    module.model.train()
    module.model.zero_grad()
    ref_logits = module.reference_logits(batch)
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    held = logits.detach().requires_grad_(True)
    held_logits, targets, mask = next_token_targets(held, batch["labels"])
    ref_logits, _, _ = next_token_targets(ref_logits.clone(), batch["labels"])
    losses, _ = preference_loss_from_logits(held_logits, ref_logits, targets, mask, **module.objective)
    (logit_grad,) = torch.autograd.grad(losses.mean(), held)
    logits.backward(logit_grad)
    params = torch.cat([w.grad.flatten() for w in module.model.parameters() if w.requires_grad])
    return params, logit_grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=512, help="without --model")
    parser.add_argument("--model", type=Path, help="a Hugging Face model folder instead of a random tiny Llama")
    parser.add_argument("--pairs", type=int, default=8)
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    stage = params.train_reward
    if args.model is not None:
        args.vocab = load_causal_lm(args.model).config.vocab_size
    batch = _batch(args.pairs, args.vocab, prompt=12, response=20, seed=0)
    rejected = batch["labels"].clone()
    rejected[: args.pairs] = -100  # the rejected half's response positions
    _, _, rejected_mask = next_token_targets(batch["input_ids"].float(), rejected)

    def module_for(measure: str, mu: float) -> PreferenceModule:
        torch.manual_seed(0)
        if args.model is not None:
            model = load_causal_lm(args.model)
        else:
            model = build_scratch_model(params.sft.model, _Vocabulary(args.vocab))
        risk = stage.risk.model_copy(update={"measure": measure, "mu": mu})
        section = stage.model_copy(update={"loss": "tdpo" if measure == "kl" else "rsa", "risk": risk})
        return PreferenceModule(attach_lora(model, stage.lora), stage.train, section.objective(), None)

    tdpo_params, tdpo_logits = _gradients(module_for("kl", 1.0), batch)
    tdpo_pad = tdpo_logits[..., 0][rejected_mask].abs().mean()
    source = args.model or "params.yaml sft.model, random weights"
    print(f"Tiny Llama ({source}, V = {args.vocab}) + LoRA r = {stage.lora.r}, fresh adapter, "
          f"alpha = {stage.alpha}, beta = {stage.beta}; first-step gradient against TDPO's.\n")  # fmt: skip
    print("| measure | mu | cosine to TDPO | norm / TDPO's | pad-logit push / TDPO's |")
    print("|---|---:|---:|---:|---:|")
    for measure in (m for m in MUS if m in RISK_MEASURES):
        for mu in MUS[measure]:
            grad_params, grad_logits = _gradients(module_for(measure, mu), batch)
            cosine = torch.nn.functional.cosine_similarity(grad_params, tdpo_params, dim=0)
            norm = grad_params.norm() / tdpo_params.norm()
            pad = grad_logits[..., 0][rejected_mask].abs().mean() / tdpo_pad
            print(f"| {measure} | {mu:g} | {cosine:.6f} | {norm:.4f} | {pad:.2f} |")


if __name__ == "__main__":
    main()
