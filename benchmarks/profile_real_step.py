"""Profile one preference step on a real model on the CPU, and say what the machine could reach.

One step as benchmarks/bench_step.py drives it (PreferenceModule.training_step, backward, the
fused grad-norm pass, clipping, AdamW), on a real local model (Hugging Face folder) with a LoRA
adapter on every projection, in full precision or QLoRA NF4 (rsa_pl.models.load_quantized, as
the pipeline loads it), rsa-cvar, B pairs x T tokens of random ids. Prints:
- the median step time and tokens/s;
- a torch.profiler table of one step (self CPU time by op);
- the step's matrix-multiply FLOPs, counted from the model's shapes (policy forward, its backward
  to the inputs and to the adapters, the reference forward; attention scores included), and the
  time they would take at the float32 matmul rate this machine reaches right now on the step's
  own shapes (measured in the same process): the time a step cannot beat, next to what it takes.

    python benchmarks/profile_real_step.py --model /tmp/smol/hf                  # full precision
    python benchmarks/profile_real_step.py --model /tmp/smol/hf --nf4 --threads 2

The model folder: benchmarks/real_model_qlora.py's docstring says how to get SmolLM2-135M offline.
Writes nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_check import make_batch  # noqa: E402  (benchmarks/gpu_check.py: scripts run with benchmarks/ on sys.path)

from rsa_pl.config import QuantizationParams  # noqa: E402
from rsa_pl.models import attach_lora, load_causal_lm, load_quantized  # noqa: E402
from rsa_pl.modules import PreferenceModule  # noqa: E402
from rsa_pl.params_file import load_params, parse_params  # noqa: E402


def _section(pairs: int):
    raw = load_params(ROOT / "params.yaml").model_dump()
    raw["train_reward"].update(loss="rsa", alpha=0.5, risk={"measure": "cvar", "mu": 0.95})
    raw["train_reward"]["train"]["batch_size"] = pairs
    return parse_params(raw, "params.yaml + profile overrides").train_reward


def step_flops(config, sequences: int, seq: int, keep: int, lora_r: int) -> float:
    """Matmul FLOPs of one step: the policy forward (F), its backward to the inputs (F) and to the
    adapters, the frozen reference forward (F); F = 2 x multiply-adds of the projections, the
    attention scores and values, and the LM head over the `keep` last positions."""
    h, layers, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    head_dim = h // heads
    tokens = sequences * seq
    proj = h * h * 2 + h * kv * head_dim * 2 + 3 * h * inter  # q, o; k, v; gate, up, down (per token)
    attention = 2 * seq * h  # scores and values, per token (full square; causal masking wastes half)
    lora = lora_r * (2 * h + 2 * (h + kv * head_dim) + 3 * (h + inter))  # A and B of the 7 projections
    per_layer = 2 * tokens * (proj + attention + lora)
    head = 2 * sequences * keep * h * config.vocab_size
    forward = layers * per_layer + head
    adapters = layers * 2 * tokens * lora * 2  # weight gradients of A and B
    return 3 * forward + adapters


def matmul_rate(config, tokens: int, repeats: int = 5) -> float:
    """FLOP/s of float32 matmuls of the step's own shapes (an MLP projection, the LM head)."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    x = torch.randn(tokens, h)
    columns = min(vocab, 32768)
    shapes = [(torch.randn(h, inter), 2 * tokens * h * inter), (torch.randn(h, columns), 2 * tokens * h * columns)]
    rates = []
    for w, flops in shapes:
        x @ w
        start = time.perf_counter()
        for _ in range(repeats):
            x @ w
        rates.append(flops * repeats / (time.perf_counter() - start))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face model folder")
    parser.add_argument("--nf4", action="store_true", help="QLoRA: the base in 4 bits (bitsandbytes NF4)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=96)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--rows", type=int, default=20, help="profiler table rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    section = _section(args.pairs)
    start = time.perf_counter()
    if args.nf4:
        quantization = QuantizationParams(bits=4, quant_type="nf4", double_quant=True, compute_dtype="float32")
        base = load_quantized(args.model, quantization, "cpu", gradient_checkpointing=False)
    else:
        base = load_causal_lm(args.model)
    load_s = time.perf_counter() - start
    policy = attach_lora(base, section.lora)
    module = PreferenceModule(policy, section.train, section.objective(), None, None, stage="train_reward")
    trainable = [w for w in policy.parameters() if w.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=section.train.lr)
    batch = make_batch(args.pairs, args.prompt_len, args.response_len, base.config.vocab_size, "cpu")
    module.on_fit_start()
    calls = iter(range(1 << 30))

    def step() -> float:
        loss = module.training_step(batch, next(calls))
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, section.train.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    sequences, seq = 2 * args.pairs, args.prompt_len + args.response_len
    tokens = sequences * seq
    flops = step_flops(base.config, sequences, seq, args.response_len + 1, section.lora.r)
    rate = matmul_rate(base.config, tokens)
    kind = "QLoRA NF4" if args.nf4 else "LoRA, float32 base"
    print(f"{args.model} ({kind}), rsa-cvar, B {args.pairs} pairs x T {seq}, {torch.get_num_threads()} threads; "
          f"load {load_s:.1f} s; 1-min load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"step: median {median:.2f} s of {[round(t, 2) for t in times]}, {tokens / median:.0f} tokens/s")
    print(f"matmul FLOPs of the step {flops / 1e9:.0f} G; float32 matmul rate here now {rate / 1e9:.0f} GFLOP/s "
          f"-> {flops / rate:.2f} s at that rate ({flops / rate / median:.0%} of the step)")  # fmt: skip
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
