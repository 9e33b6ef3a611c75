"""What needs a GPU, in one run of a few minutes on one H100/H200 (gpu_check.sh stops it at 8).

The training settings are configs/paper.yaml's train_reward (LoRA r 8, alpha 16, dropout 0.05
on q/k/v/o/gate/up/down; rsa-cvar mu 0.95, beta 0.1, alpha 0.5; AdamW), on random token ids.
Models are randomly initialised Llamas built on the device: nothing is downloaded. Each part
prints its lines as soon as it is measured, and the JSON (--out) is rewritten after each part,
so a run stopped by the time limit keeps the parts it finished. The parts, in the order run:

1. bf16 + LoRA throughput, rsa-cvar: a 0.89B Llama ("1b": hidden 2048, 16 layers, 16 heads,
   intermediate 5632, vocab 32000, tied embeddings) in bf16 under bf16 autocast, at T 512
   (B 4 pairs x (128 + 384)) and T 2048 (B 2 pairs x (512 + 1536)), no gradient checkpointing:
   tokens per step, median step time, tokens/s, MFU and peak memory. Model FLOPs per token are
   counted as 6 N (policy forward 2N, its backward 2N for input gradients only, the frozen
   reference forward 2N; LoRA's own and attention's FLOPs left out), so MFU is a lower bound.
2. rsa-cvar against dpo, step time and peak memory, for each loss path (LOSS_PATHS, a dict of
   name -> loss function, so that another path is one more entry): "fused", the training
   default (PreferenceModule.losses: the chunked closed-form loss of rsa_pl.fast.chunked), and
   "plain" (the same logits through rsa_pl.losses.sequence_terms + preference_loss: full
   (N, T, V) float32 log-probabilities and autograd), on part 1's model at both lengths; and
   that the two paths give the same per-pair losses and metrics on the same weights (LoRA B
   set to noise for that check, so that the policy differs from its reference).
3. QLoRA: part 1's model saved and reloaded by rsa_pl.models.load_quantized (NF4, double
   quantisation, bf16 compute: the preset's quantization), a LoRA adapter on it, rsa-cvar at
   both lengths: load time, step time, tokens/s, MFU, peak memory, finite losses.
4. The paper preset's step (configs/paper.yaml train_reward as it is: QLoRA NF4, B 16 pairs
   x T 512 (128 + 384), gradient checkpointing, rsa-cvar over the full vocabulary) on the
   Llama-2-7B geometry (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000,
   untied embeddings): peak memory and step time at 4 and 8 layers, their linear
   extrapolation in the layer count to 32 (printed as such), then all 32 layers measured when
   the time budget (--budget-s) allows. The 4-bit model is built without a 14 GB checkpoint:
   transformers' own from_pretrained + bitsandbytes quantizer, fed a bf16 state dict made on the
   device instead of a folder, then load_quantized's own preparation. It is first checked
   bit for bit against load_quantized from disk on a 1-layer model of the same geometry.

    bash benchmarks/gpu_check.sh                              # on the GPU: prints, writes results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --size tiny   # every part with tiny shapes on a CPU, in seconds

With --device cpu, memory is the process's peak resident set (Linux VmHWM, reset before each
measurement), not the tensors' own, and MFU needs --peak-tflops. When bitsandbytes cannot do
4-bit on the device, parts 3 and 4 say so in one line and the run carries on. The exit status
is 1 when a part failed (its error is in the JSON and the output), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peft import prepare_model_for_kbit_training  # noqa: E402
from transformers import (  # noqa: E402
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from rsa_pl.data.collate import PreferenceCollator  # noqa: E402
from rsa_pl.data.tokenize import IGNORE_INDEX  # noqa: E402
from rsa_pl.losses import preference_loss, sequence_terms  # noqa: E402
from rsa_pl.models import (  # noqa: E402
    QuantizationUnavailableError,
    attach_lora,
    check_quantization_backend,
    count_parameters,
    keep_4bit_layers_trainable,
    load_quantized,
)
from rsa_pl.modules import PreferenceModule, logits_window, next_token_targets  # noqa: E402
from rsa_pl.params_file import load_params  # noqa: E402

PRESET = ROOT / "configs" / "paper.yaml"
# Part 1-3's model, and part 4's geometry (Llama-2-7B; alpaca-7b-reproduced is a LLaMA-7B of
# the same shapes), each with its tiny stand-in for --size tiny. "probe_layers": part 4's
# trimmed depths, from which the full depth is extrapolated.
SIZES: dict[str, dict[str, Any]] = {
    "1b": {
        "hidden_size": 2048,
        "num_layers": 16,
        "num_heads": 16,
        "intermediate_size": 5632,
        "vocab": 32000,
        "tied": True,
    },
    "tiny": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_size": 128,
        "vocab": 512,
        "tied": True,
    },
}
PAPER_GEOMETRY: dict[str, dict[str, Any]] = {
    "1b": {
        "label": "Llama-2-7B",
        "hidden_size": 4096,
        "num_layers": 32,
        "num_heads": 32,
        "intermediate_size": 11008,
        "vocab": 32000,
        "tied": False,
        "probe_layers": (4, 8),
    },
    "tiny": {
        "label": "tiny",
        "hidden_size": 64,
        "num_layers": 3,
        "num_heads": 4,
        "intermediate_size": 128,
        "vocab": 512,
        "tied": False,
        "probe_layers": (1, 2),
    },
}
# (pairs, prompt, response) of parts 1-3: T 512 and T 2048 (tiny: T 32 and 128); part 4's
# prompt length (its T is the preset's prepare.max_length; tiny: 32).
SHAPES = {"1b": [(4, 128, 384), (2, 512, 1536)], "tiny": [(4, 8, 24), (1, 32, 96)]}
PAPER_PROMPT = {"1b": 128, "tiny": 8}
PAPER_SEQ = {"tiny": 32}
# Untimed and timed steps of each part (the command line overrides them).
STEPS = {
    "1b": {"warmup": 2, "steps": 5, "path_steps": 3, "paper_steps": 2},
    "tiny": {"warmup": 1, "steps": 2, "path_steps": 1, "paper_steps": 1},
}
# Dense bf16 peak TFLOPS by device name, the first match (NVIDIA's data sheets); --peak-tflops overrides.
PEAKS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "L4": 121.0,
}
# The objectives compared in part 2 (--methods picks; part 2's ratios are to dpo).
METHODS: dict[str, dict[str, Any]] = {
    "dpo": {"loss": "dpo", "alpha": 0.0, "risk": None},
    "rsa-cvar": {"loss": "rsa", "alpha": 0.5, "risk": {"measure": "cvar", "mu": 0.95}},
    "tdpo": {"loss": "tdpo", "alpha": 0.5, "risk": {"measure": "kl", "mu": 1.0}},
    "rsa-erm": {"loss": "rsa", "alpha": 0.5, "risk": {"measure": "erm", "mu": 5.0}},
}

Losses = Callable[[PreferenceModule, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def fused_losses(module: PreferenceModule, batch: dict[str, torch.Tensor]):
    """The training default: PreferenceModule.losses (the chunked closed-form loss)."""
    return module.losses(batch)


def plain_losses(module: PreferenceModule, batch: dict[str, torch.Tensor]):
    """PreferenceModule.losses with the plain unfused loss: the same logits, labels and mask
    (mirrored from modules.py), then sequence_terms (full (N, T, V) log-probabilities) and
    preference_loss, differentiated by autograd."""
    keep = logits_window(batch["labels"])
    ref_logits = module.reference_logits(batch, keep)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = module.model(**inputs, logits_to_keep=keep).logits
    labels = batch["labels"][:, -keep:]
    logits, targets, mask = next_token_targets(logits, labels)
    ref_logits, _, _ = next_token_targets(ref_logits, labels)
    o = module.objective
    terms = sequence_terms(logits, ref_logits, targets, mask, measure=o["measure"], mu=o["mu"])
    policy_chosen, policy_rejected = terms.policy_logps.chunk(2)
    ref_chosen, ref_rejected = terms.ref_logps.chunk(2)
    chosen_risk, rejected_risk = terms.risk.chunk(2) if terms.risk is not None else (None, None)
    return preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_risk, rejected_risk,
                           beta=o["beta"], alpha=o["alpha"], variant=o["variant"])  # fmt: skip


# The std of part 2's LoRA B noise: the policy then drifts from its reference (risk terms O(0.1-1)).
AGREEMENT_NOISE = 0.1
AGREEMENT_TOL = 1e-3  # both paths read the same logits and compute in float32: ~1e-6 apart
# Part 2's loss paths: name -> loss function (module, batch) -> (per-pair losses, metrics).
LOSS_PATHS: dict[str, Losses] = {"fused": fused_losses, "plain": plain_losses}


class Run:
    """The device, the clock, the report and how it is written."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device, self.size = args, args.device, args.size
        self.started = time.perf_counter()
        self.cuda = self.device == "cuda"
        self.name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.peak_tflops = args.peak_tflops or next((v for k, v in PEAKS.items() if k in self.name), float("nan"))
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.precision = "bf16-mixed" if self.cuda else "32-true"
        self.failed: list[str] = []
        self.report: dict[str, Any] = {
            "device": self.name, "size": self.size, "peak_tflops": self.peak_tflops, "torch": torch.__version__,
            "memory": "torch.cuda.max_memory_allocated" if self.cuda else "process peak RSS (VmHWM)",
        }  # fmt: skip

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def write(self) -> None:
        self.report["elapsed_s"] = self.elapsed()
        out: Path = self.args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(out.suffix + ".part")
        partial.write_text(json.dumps(self.report, indent=2, default=_jsonable) + "\n")
        partial.replace(out)

    def say(self, line: str) -> None:
        print(line, flush=True)

    def mfu(self, parameters: int, tokens_per_s: float) -> float:
        return 6 * parameters * tokens_per_s / (self.peak_tflops * 1e12)


def _jsonable(value: Any) -> Any:
    return str(value)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


# --- memory and time ---------------------------------------------------------------------------


def _vm(key: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) / 1024


def reset_peak(device: str) -> float:
    """Free what can be freed, restart the peak count; returns the memory in use now (MiB)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM back to the current RSS
    return _vm("VmRSS")


def peak_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _vm("VmHWM")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- models, batches, sections -----------------------------------------------------------------


def llama_config(shape: dict[str, Any], layers: int | None = None) -> LlamaConfig:
    """A Llama config of the shape (rsa_pl.models' scratch Llama: MHA, ids 0/1/2 pad/bos/eos)."""
    return LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        num_hidden_layers=layers or shape["num_layers"],
        num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_heads"],
        max_position_embeddings=4096,
        tie_word_embeddings=shape["tied"],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def random_model(config: LlamaConfig, device: str, dtype: torch.dtype):
    """A randomly initialised causal LM, built directly on the device (seconds for 7B on a GPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def parameter_count(config: LlamaConfig) -> int:
    """N of the config's model, counted on the meta device (no memory)."""
    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(config))


def quantized_from_state_dict(config: LlamaConfig, state_dict: dict[str, torch.Tensor], quantization, device: str,
                              gradient_checkpointing: bool):  # fmt: skip
    """rsa_pl.models.load_quantized without the folder: transformers' from_pretrained with the
    same BitsAndBytesConfig and arguments, fed the weights as a state dict, then the same
    preparation. Checked bit for bit against load_quantized by part 4 (construction_check)."""
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
    )
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
        None, config=config, state_dict=state_dict, quantization_config=bnb, device_map={"": device},
        dtype=torch.float32,
    )  # fmt: skip
    keep_4bit_layers_trainable(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)


def model_difference(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """None when the two models are the same: state dict (every tensor, quantisation state
    included, bit for bit), module types, parameters' dtype and requires_grad, the 4-bit flags
    and quantization config; else what differs first."""
    sa, sb = a.state_dict(), b.state_dict()
    if list(sa) != list(sb):
        return f"state dict keys ({sorted(set(sa) ^ set(sb))[:3]})"
    for key, x in sa.items():
        y = sb[key]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            return f"tensor {key}"
    if [(n, type(m)) for n, m in a.named_modules()] != [(n, type(m)) for n, m in b.named_modules()]:
        return "module types"
    if [(n, w.dtype, w.requires_grad) for n, w in a.named_parameters()] != [
        (n, w.dtype, w.requires_grad) for n, w in b.named_parameters()
    ]:
        return "parameters' dtype or requires_grad"
    for flag in ("is_loaded_in_4bit", "is_quantized", "is_gradient_checkpointing"):
        if getattr(a, flag, None) != getattr(b, flag, None):
            return flag
    if a.config.quantization_config.to_dict() != b.config.quantization_config.to_dict():
        return "quantization_config"
    return None


def make_batch(pairs: int, prompt: int, response: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    """[chosen; rejected] random ids, prompt positions unlabelled, as the collator makes them."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(pairs):
        p = torch.randint(3, vocab, (prompt,), generator=g).tolist()
        c, r = (torch.randint(3, vocab, (response,), generator=g).tolist() for _ in range(2))
        masked = [IGNORE_INDEX] * prompt
        rows.append({"chosen_input_ids": p + c, "rejected_input_ids": p + r,
                     "chosen_labels": masked + c, "rejected_labels": masked + r})  # fmt: skip
    return {k: v.to(device) for k, v in PreferenceCollator(0)(rows).items()}


def section_for(method: str, pairs: int, precision: str, gradient_checkpointing: bool | None = None):
    """configs/paper.yaml's train_reward with the method's objective and the batch size."""
    section = load_params(PRESET).train_reward
    train = {"batch_size": pairs, "precision": precision}
    if gradient_checkpointing is not None:
        train["gradient_checkpointing"] = gradient_checkpointing
    raw = section.model_dump()
    raw.update(METHODS[method])
    raw["train"].update(train)
    return type(section).model_validate(raw)


# --- one measured step -------------------------------------------------------------------------


def measure(run: Run, policy, section, batch, warmup: int, steps: int, path: str = "fused",
            parameters: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Steps as bench_step drives them (the module's loss, backward, the fused grad-norm pass,
    clipping, AdamW) without a Lightning Trainer: median step time, tokens/s, MFU, peak memory."""
    device = run.device
    module = PreferenceModule(policy, section.train, section.objective(), None, None, stage="train_reward")
    trainable = [w for w in policy.parameters() if w.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=section.train.lr)
    module.on_fit_start()
    autocast = section.train.precision.startswith("bf16") and device == "cuda"
    losses_of = LOSS_PATHS[path]

    def step(index: int) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            losses, _ = losses_of(module, batch)
            loss = module.checked(losses.mean(), index)  # as training_step (its self.log calls need a Trainer)
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    before = reset_peak(device)
    losses = [step(i) for i in range(warmup)]
    times = []
    for i in range(steps):
        _sync(device)
        start = time.perf_counter()
        losses.append(step(warmup + i))
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = peak_mib(device)
    median = statistics.median(times)
    tokens = batch["input_ids"].numel()
    result = {
        "pairs": batch["input_ids"].shape[0] // 2, "seq": batch["input_ids"].shape[1], "tokens_per_step": tokens,
        "median_step_s": median, "step_times_s": times, "tokens_per_s": tokens / median,
        "peak_mib": peak, "before_step_mib": before, "step_mib": max(peak - before, 0.0), "losses": losses,
        "finite": all(math.isfinite(x) for x in losses),
    }  # fmt: skip
    if parameters is not None:
        result.update(parameters=parameters, mfu=run.mfu(parameters, tokens / median),
                      model_tflops_per_s=6 * parameters * tokens / median / 1e12)  # fmt: skip
    return result


def _line(m: dict[str, Any]) -> str:
    mfu = f", MFU {m['mfu']:.1%}" if math.isfinite(m.get("mfu", float("nan"))) else ""
    return (f"B {m['pairs']} pairs x T {m['seq']} = {m['tokens_per_step']:,} tokens/step, "
            f"{m['median_step_s']:.3f} s/step (median of {len(m['step_times_s'])}), {m['tokens_per_s']:,.0f} tokens/s"
            f"{mfu}, peak {m['peak_mib']:,.0f} MiB, losses {m['losses'][0]:.4f} -> {m['losses'][-1]:.4f}"
            f"{'' if m['finite'] else ' NOT FINITE'}")  # fmt: skip


def _part(run: Run, key: str, label: str, body: Callable[[], None]) -> None:
    """Run one part; a failure is one line and an entry in the report, and the run carries on."""
    try:
        body()
    except Exception as error:  # the next part still runs
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        run.report.setdefault(key, {})["error"] = f"{type(error).__name__}: {first}"
        run.failed.append(key)
        run.say(f"{label} FAILED: {type(error).__name__}: {first}")
    finally:
        run.write()
        reset_peak(run.device)


def _shapes(run: Run) -> list[tuple[int, int, int]]:
    return SHAPES[run.size]


# --- the parts ---------------------------------------------------------------------------------


def part_bf16(run: Run, state: dict[str, Any]) -> None:
    """1. bf16 + LoRA throughput at each length; keeps the model for parts 2 and 3."""
    shape = SIZES[run.size]
    config = llama_config(shape)
    started = time.perf_counter()
    base = random_model(config, run.device, run.dtype)
    n = count_parameters(base)
    policy = attach_lora(base, section_for("rsa-cvar", 1, run.precision, False).lora)
    built = time.perf_counter() - started
    state.update(config=config, policy=policy, parameters=n)
    out = run.report["bf16"] = {"parameters": n, "build_s": built, "by_seq": {}}
    dtype = "bf16" if run.cuda else "float32 (CPU mode)"
    run.say(f"1. {dtype} + LoRA, rsa-cvar, {_count(n)} Llama (h {shape['hidden_size']}, "
            f"{shape['num_layers']} layers, V {shape['vocab']}), built in {built:.1f} s:")  # fmt: skip
    for pairs, prompt, response in _shapes(run):
        section = section_for("rsa-cvar", pairs, run.precision, False)
        batch = make_batch(pairs, prompt, response, shape["vocab"], run.device)
        m = measure(run, policy, section, batch, run.args.warmup, run.args.steps, parameters=n)
        out["by_seq"][str(prompt + response)] = m
        run.say(f"   T {prompt + response:>4} ({prompt}+{response}): {_line(m)}")
        run.write()


def part_paths(run: Run, state: dict[str, Any]) -> None:
    """2. each method's step time and peak memory for each loss path, ratios to dpo."""
    policy, vocab = state["policy"], SIZES[run.size]["vocab"]
    methods = run.args.methods
    out = run.report["loss_paths"] = {"methods": methods, "paths": list(LOSS_PATHS), "by_seq": {}}
    run.say(f"2. loss paths ({', '.join(LOSS_PATHS)}; fused = the chunked closed-form loss that training uses, "
            f"plain = sequence_terms + preference_loss under autograd), ratios to dpo:")  # fmt: skip
    for pairs, prompt, response in _shapes(run):
        seq = prompt + response
        batch = make_batch(pairs, prompt, response, vocab, run.device)
        by_path: dict[str, Any] = {}
        out["by_seq"][str(seq)] = by_path
        agreement = _loss_agreement(run, policy, batch, pairs)
        by_path["agreement"] = agreement
        run.say(f"   T {seq:>4}: on the same (perturbed) weights, fused vs plain per-pair losses and metrics differ by "
                f"{', '.join(f'{k} {v:.1e}' for k, v in agreement.items())}")  # fmt: skip
        for path in LOSS_PATHS:
            rows = by_path[path] = {}
            for method in methods:
                section = section_for(method, pairs, run.precision, False)
                rows[method] = measure(run, policy, section, batch, 1, run.args.path_steps, path=path)
                run.write()
            dpo = rows.get("dpo")
            for method, m in rows.items():
                if dpo is not None:
                    m["time_x_dpo"] = m["median_step_s"] / dpo["median_step_s"]
                    m["peak_x_dpo"] = m["peak_mib"] / dpo["peak_mib"]
                    m["step_mib_x_dpo"] = m["step_mib"] / dpo["step_mib"] if dpo["step_mib"] > 0 else float("nan")
                ratio = f" ({m['time_x_dpo']:.2f} x dpo)" if dpo is not None else ""
                own = f"; the step's own {m['step_mib']:,.0f} MiB, {m['step_mib_x_dpo']:.2f} x dpo" if run.cuda else ""
                memory = f" ({m['peak_x_dpo']:.2f} x dpo{own})" if dpo else ""
                run.say(f"   T {seq:>4} {path:6s} {method:9s} {m['median_step_s']:.3f} s/step{ratio}, "
                        f"peak {m['peak_mib']:,.0f} MiB{memory}")  # fmt: skip
            run.write()
    agreement = {seq: by_path["agreement"] for seq, by_path in out["by_seq"].items()}
    disagree = {seq: a for seq, a in agreement.items() if max(a.values()) > AGREEMENT_TOL}
    if disagree:  # after the timings, which are kept
        raise RuntimeError(f"the loss paths disagree by more than {AGREEMENT_TOL} (by T): {disagree}")


def _loss_agreement(run: Run, policy, batch, pairs: int) -> dict[str, float]:
    """Per method, the largest difference between the paths' per-pair losses and metrics
    (|a - b| / max(1, |a|)), on the same weights, without dropout, no step taken. The LoRA B
    matrices are set to noise meanwhile (then restored): at policy == reference the risk terms
    are ~0 and a path that mixed them up would still agree."""
    out = {}
    lora_b = [w for name, w in policy.named_parameters() if "lora_B" in name]
    saved = [w.detach().clone() for w in lora_b]
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for w in lora_b:
                w.copy_(torch.randn(w.shape, generator=generator) * AGREEMENT_NOISE)
        policy.eval()  # no LoRA dropout: both paths see the same logits
        for method in run.args.methods:
            section = section_for(method, pairs, run.precision, False)
            module = PreferenceModule(policy, section.train, section.objective(), None, None, stage="train_reward")
            results = []
            for path in LOSS_PATHS.values():
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=run.cuda):
                    losses, metrics = path(module, batch)
                results.append({"loss": losses, **metrics})
            worst = 0.0
            for other in results[1:]:
                for key, a in results[0].items():
                    a, b = a.double(), other[key].double()
                    worst = max(worst, float(((a - b).abs() / a.abs().clamp(min=1)).max()))
            if not all(torch.isfinite(r["loss"]).all() for r in results):
                raise RuntimeError(f"{method}: a non-finite loss {[r['loss'].tolist() for r in results]}")
            out[method] = worst
    finally:
        with torch.no_grad():
            for w, value in zip(lora_b, saved, strict=True):
                w.copy_(value)
        policy.train()
    return out


def _quantization(run: Run):
    """The preset's quantization, or None (and one line) when bitsandbytes cannot do it here."""
    quant = load_params(PRESET).train_reward.quantization
    try:
        check_quantization_backend(quant, run.device)
    except QuantizationUnavailableError as error:
        return quant, str(error)
    return quant, None


def part_nf4(run: Run, state: dict[str, Any]) -> None:
    """3. part 1's model saved, reloaded by load_quantized, LoRA, rsa-cvar steps at each length."""
    quant, unavailable = _quantization(run)
    if unavailable:
        run.report["nf4"] = {"unavailable": unavailable}
        run.say(f"3. QLoRA NF4: not run, {unavailable}")
        return
    policy, n, vocab = state.pop("policy"), state["parameters"], SIZES[run.size]["vocab"]
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        policy.unload().save_pretrained(folder)  # the LoRA layers removed, not merged: part 1's base weights
        del policy
        reset_peak(run.device)
        started = time.perf_counter()
        quantized = load_quantized(folder, quant, run.device, gradient_checkpointing=False)
        loaded = time.perf_counter() - started
    policy4 = attach_lora(quantized, section_for("rsa-cvar", 1, run.precision, False).lora)
    out = run.report["nf4"] = {"quantization": quant.model_dump(), "load_s": loaded, "by_seq": {}}
    run.say(f"3. QLoRA ({quant.quant_type}, double quant {quant.double_quant}, {quant.compute_dtype} compute) + LoRA, "
            f"rsa-cvar, the same {_count(n)} model by rsa_pl.models.load_quantized in {loaded:.1f} s:")  # fmt: skip
    for pairs, prompt, response in _shapes(run):
        section = section_for("rsa-cvar", pairs, run.precision, False)
        batch = make_batch(pairs, prompt, response, vocab, run.device)
        m = measure(run, policy4, section, batch, 1, run.args.path_steps, parameters=n)
        out["by_seq"][str(prompt + response)] = m
        run.say(f"   T {prompt + response:>4} ({prompt}+{response}): {_line(m)}")
        run.write()


def part_paper(run: Run, state: dict[str, Any]) -> None:
    """4. the paper preset's step on the 7B geometry: trimmed depths, extrapolation, full depth."""
    state.clear()
    quant, unavailable = _quantization(run)
    if unavailable:
        run.report["paper"] = {"unavailable": unavailable}
        run.say(f"4. paper preset: not run, {unavailable}")
        return
    params = load_params(PRESET)
    section = params.train_reward.model_copy(
        update={"train": params.train_reward.train.model_copy(update={"precision": run.precision})}
    )
    g = PAPER_GEOMETRY[run.size]
    full, probes = g["num_layers"], g["probe_layers"]
    pairs = section.train.batch_size
    seq = PAPER_SEQ.get(run.size, params.prepare.max_length)
    prompt = PAPER_PROMPT[run.size]
    checkpointing = section.train.gradient_checkpointing
    out: dict[str, Any] = {
        "geometry": {k: v for k, v in g.items() if k != "probe_layers"}, "pairs": pairs, "seq": seq, "prompt": prompt,
        "quantization": quant.model_dump(), "gradient_checkpointing": checkpointing, "objective": section.objective(),
        "lora": section.lora.model_dump(), "by_layers": {},
    }  # fmt: skip
    run.report["paper"] = out
    run.say(f"4. paper preset (configs/paper.yaml train_reward): {g['label']} geometry (h {g['hidden_size']}, "
            f"{full} layers, V {g['vocab']}), {quant.quant_type} + LoRA r {section.lora.r}, rsa-cvar, B {pairs} pairs "
            f"x T {seq} ({prompt}+{seq - prompt}), gradient checkpointing {checkpointing}:")  # fmt: skip
    batch = make_batch(pairs, prompt, seq - prompt, g["vocab"], run.device)

    difference, tensors = construction_check(run, g, quant, checkpointing)
    out["construction_check"] = {"layers": 1, "tensors": tensors, "matches_load_quantized": difference is None,
                                 "difference": difference}  # fmt: skip
    run.write()
    if difference is None:
        run.say(f"   construction: in memory == rsa_pl.models.load_quantized from disk, 1 layer, {tensors} tensors "
                f"bit for bit")  # fmt: skip
    else:  # measured all the same; the part fails at its end
        run.say(f"   construction: the in-memory 4-bit model DIFFERS from load_quantized's ({difference})")

    def at(layers: int) -> dict[str, Any]:
        config = llama_config(g, layers)
        started = time.perf_counter()
        source = random_model(config, run.device, torch.bfloat16)
        model = quantized_from_state_dict(config, source.state_dict(), quant, run.device, checkpointing)
        del source
        policy = attach_lora(model, section.lora)
        built = time.perf_counter() - started
        n = parameter_count(config)
        m = measure(run, policy, section, batch, 1, run.args.paper_steps, parameters=n)
        m.update(layers=layers, build_s=built)
        del policy, model
        out["by_layers"][str(layers)] = m
        run.say(f"   {layers:>2} layer{'s' if layers > 1 else ' '} (built in {built:.1f} s): {_line(m)}")
        run.write()
        return m

    measured = [at(layers) for layers in probes]
    (l0, m0), (l1, m1) = zip(probes, measured, strict=True)
    extrapolated = {}
    for key in ("peak_mib", "median_step_s", "build_s"):
        slope = (m1[key] - m0[key]) / (l1 - l0)
        extrapolated[key] = m1[key] + slope * (full - l1)
    n_full = parameter_count(llama_config(g))
    extrapolated["tokens_per_s"] = measured[0]["tokens_per_step"] / extrapolated["median_step_s"]
    extrapolated["mfu"] = run.mfu(n_full, extrapolated["tokens_per_s"])
    extrapolated["from_layers"] = list(probes)
    out["extrapolated"] = extrapolated
    run.say(f"   {full} layers EXTRAPOLATED (linear in the layer count from {l0} and {l1} layers, not measured): "
            f"peak {extrapolated['peak_mib']:,.0f} MiB, {extrapolated['median_step_s']:.3f} s/step, "
            f"{extrapolated['tokens_per_s']:,.0f} tokens/s"
            + (f", MFU {extrapolated['mfu']:.1%}" if math.isfinite(extrapolated["mfu"]) else ""))  # fmt: skip
    run.write()

    # the full depth, when the budget allows: build + warmup + steps, scaled from the deepest probe
    need = (extrapolated["build_s"] + (1 + run.args.paper_steps) * extrapolated["median_step_s"]) * 1.5 + 10
    left = max(run.left(), 0.0)
    if need > left:
        out["full"] = {"skipped": f"needs ~{need:.0f} s, {left:.0f} s of the budget left"}
        run.say(f"   {full} layers not measured: it needs ~{need:.0f} s and {left:.0f} s of --budget-s are left")
    else:
        m = at(full)
        m["vs_extrapolated"] = {k: m[k] / extrapolated[k] for k in ("peak_mib", "median_step_s")}
        out["full"] = m
        run.say(f"   {full} layers measured: peak {m['peak_mib']:,.0f} MiB = {m['vs_extrapolated']['peak_mib']:.2f} x "
                f"the extrapolation, step {m['vs_extrapolated']['median_step_s']:.2f} x")  # fmt: skip
    if difference is not None:
        raise RuntimeError(f"the in-memory 4-bit model differs from load_quantized's: {difference}")


def construction_check(run: Run, g: dict[str, Any], quant, checkpointing: bool) -> tuple[str | None, int]:
    """A 1-layer model of the geometry, saved and loaded by load_quantized, against the same
    weights through quantized_from_state_dict: (what differs or None, tensors compared)."""
    config = llama_config(g, 1)
    source = random_model(config, run.device, torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        source.save_pretrained(folder)
        from_disk = load_quantized(folder, quant, run.device, checkpointing)
    in_memory = quantized_from_state_dict(config, source.state_dict(), quant, run.device, checkpointing)
    del source
    difference = model_difference(from_disk, in_memory)
    return difference, len(in_memory.state_dict())


PARTS = [
    ("bf16", "1. bf16 + LoRA:", part_bf16),
    ("loss_paths", "2. loss paths:", part_paths),
    ("nf4", "3. QLoRA NF4:", part_nf4),
    ("paper", "4. paper preset:", part_paper),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="1b", choices=list(SIZES))
    parser.add_argument("--warmup", type=int, default=None, help="part 1's untimed steps (default 2; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="part 1's timed steps (default 5; tiny 2)")
    parser.add_argument("--path-steps", type=int, default=None,
                        help="parts 2 and 3's timed steps, after 1 untimed (default 3; tiny 1)")  # fmt: skip
    parser.add_argument("--paper-steps", type=int, default=None,
                        help="part 4's timed steps, after 1 untimed (default 2; tiny 1)")  # fmt: skip
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["dpo", "rsa-cvar"],
                        help=f"part 2's methods, comma-separated, of {', '.join(METHODS)}")  # fmt: skip
    parser.add_argument("--parts", type=lambda s: s.split(","), default=[k for k, _, _ in PARTS],
                        help="the parts to run, comma-separated (1 and 2 need 1's model, 3 too)")  # fmt: skip
    budget = "seconds: part 4 measures the full depth only if it fits (gpu_check.sh kills the run at 480)"
    parser.add_argument("--budget-s", type=float, default=400.0, help=budget)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args()
    unknown = [m for m in args.methods if m not in METHODS] + [
        p for p in args.parts if p not in [k for k, _, _ in PARTS]
    ]
    if unknown:
        parser.error(f"unknown method or part: {', '.join(unknown)}")
    for key, default in STEPS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --device cpu --size tiny to check the script itself)")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for noise in (
        r"You are trying to `self.log\(\)`",
        r".*is deprecated and will be removed in v6",
        r".*use_reentrant",
    ):
        warnings.filterwarnings("ignore", message=noise)
    # as the test suite does: backprop silently skipping a 4-bit layer is an error, not a warning
    warnings.filterwarnings("error", message=".*autograd kernel was not registered.*", category=UserWarning)
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: a second thread only adds contention (5x slower on a busy 2-core box)
    run = Run(args)
    run.say(f"gpu_check on {run.name} (dense bf16 peak {run.peak_tflops} TFLOPS), torch {torch.__version__}, "
            f"size {run.size}, budget {args.budget_s:.0f} s; memory: {run.report['memory']}")  # fmt: skip
    state: dict[str, Any] = {}
    for key, label, body in PARTS:
        if key not in args.parts:
            continue
        if key in ("loss_paths", "nf4") and "policy" not in state:
            run.report[key] = {"skipped": "needs part 1's model"}
            run.say(f"{label} skipped: it needs part 1's model")
            continue
        _part(run, key, label, lambda body=body: body(run, state))
        run.say(f"   ({run.elapsed():.0f} s so far)")
    run.write()
    run.say(f"wrote {args.out} in {run.elapsed():.0f} s" + (f"; FAILED: {', '.join(run.failed)}" if run.failed else ""))
    sys.exit(1 if run.failed else 0)


if __name__ == "__main__":
    main()
