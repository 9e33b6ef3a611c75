"""What needs a GPU, in one short run: bf16 throughput and MFU, the 4-bit path, rsa-cvar's memory.

1. bf16 step of a randomly initialised ~1.1B Llama (hidden 2048, 16 layers, vocab 32000) with
   LoRA r 8 on every projection, rsa-cvar (RSA, mu 0.95), B 4 pairs x T 512 (128 + 384): median
   step time, tokens/s and MFU against the card's dense bf16 peak. Model FLOPs per token are
   counted as 6 N (policy forward 2N, its backward 2N for input gradients only, the frozen
   reference forward 2N; LoRA's own and attention's FLOPs left out), so MFU is a lower bound.
2. The 4-bit path: the same model saved, reloaded by rsa_pl.models.load_quantized (NF4, double
   quantisation, bf16 compute), a LoRA adapter on it, steps of rsa-cvar: load time, step
   time, peak memory, and that the loss stays finite.
3. Peak memory of one step of rsa-cvar against dpo (and tdpo, rsa-erm) at T = 512, B 4, bf16.

    bash benchmarks/gpu_check.sh              # all three, prints a report, writes results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --size tiny   # the logic on a CPU, in seconds

The steps are driven as benchmarks/bench_step.py drives them (PreferenceModule.training_step,
backward, the fused grad-norm pass, clipping, AdamW), without a Lightning Trainer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rsa_pl.config import QuantizationParams  # noqa: E402
from rsa_pl.data.collate import PreferenceCollator  # noqa: E402
from rsa_pl.data.tokenize import IGNORE_INDEX  # noqa: E402
from rsa_pl.models import attach_lora, build_scratch_model, count_parameters, load_quantized  # noqa: E402
from rsa_pl.modules import PreferenceModule  # noqa: E402
from rsa_pl.params_file import load_params, parse_params  # noqa: E402

SIZES = {
    "1b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 16, "intermediate_size": 5632, "vocab": 32000},
    "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "vocab": 512},
}
# Dense bf16 peak TFLOPS by device name (NVIDIA's data sheets); --peak-tflops overrides.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
METHODS = {
    "dpo": {"loss": "dpo", "alpha": 0.0, "risk": None},
    "tdpo": {"loss": "tdpo", "alpha": 0.5, "risk": {"measure": "kl", "mu": 1.0}},
    "rsa-cvar": {"loss": "rsa", "alpha": 0.5, "risk": {"measure": "cvar", "mu": 0.95}},
    "rsa-erm": {"loss": "rsa", "alpha": 0.5, "risk": {"measure": "erm", "mu": 5.0}},
}


class _Vocabulary:
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


def _params(method: str, size: str, pairs: int, seq: int, precision: str):
    raw = load_params(ROOT / "params.yaml").model_dump()
    raw["train_reward"].update(METHODS[method])
    raw["train_reward"]["train"].update(batch_size=pairs, precision=precision)
    shape = {k: v for k, v in SIZES[size].items() if k != "vocab"}
    raw["sft"]["model"].update(kind="scratch", architecture="llama", max_positions=max(seq, 128), **shape)
    return parse_params(raw, "params.yaml + gpu_check overrides")


def _batch(pairs: int, prompt: int, response: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(pairs):
        p = torch.randint(3, vocab, (prompt,), generator=g).tolist()
        c, r = (torch.randint(3, vocab, (response,), generator=g).tolist() for _ in range(2))
        masked = [IGNORE_INDEX] * prompt
        rows.append({"chosen_input_ids": p + c, "rejected_input_ids": p + r,
                     "chosen_labels": masked + c, "rejected_labels": masked + r})  # fmt: skip
    return {k: v.to(device) for k, v in PreferenceCollator(0)(rows).items()}


def _stepper(policy, section, batch):
    module = PreferenceModule(policy, section.train, section.objective(), None, None, stage="train_reward")
    trainable = [w for w in policy.parameters() if w.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=section.train.lr)
    module.on_fit_start()
    calls = iter(range(1 << 30))
    autocast = section.train.precision.startswith("bf16") and batch["input_ids"].is_cuda

    def step() -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = module.training_step(batch, next(calls))
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(step, device: str, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    losses = [step() for _ in range(warmup)]
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        losses.append(step())
        _sync(device)
        times.append(time.perf_counter() - start)
    return times, losses


def _peak_mib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")


def _reset(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _model(params, size: str, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    return build_scratch_model(params.sft.model, _Vocabulary(SIZES[size]["vocab"])).to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--size", default="1b", choices=list(SIZES))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=384)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = parser.parse_args()
    device, size = args.device, args.size
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --device cpu --size tiny to check the script itself)")
    seq = args.prompt_len + args.response_len
    vocab = SIZES[size]["vocab"]
    batch = _batch(args.pairs, args.prompt_len, args.response_len, vocab, device)
    tokens = batch["input_ids"].numel()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    precision = "bf16-mixed" if device == "cuda" else "32-true"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAKS.items() if k in name), float("nan"))
    report: dict = {"device": name, "size": size, "pairs": args.pairs, "seq": seq, "tokens_per_step": tokens}
    print(f"gpu_check on {name}: {size} Llama, B {args.pairs} pairs x T {seq} ({tokens} tokens a step)", flush=True)

    # 1. bf16 throughput and MFU, rsa-cvar with LoRA
    params = _params("rsa-cvar", size, args.pairs, seq, precision)
    _reset(device)
    base = _model(params, size, device, dtype)
    n = count_parameters(base)
    saved = tempfile.TemporaryDirectory()
    base.save_pretrained(saved.name)  # for the 4-bit reload in part 2
    policy = attach_lora(base, params.train_reward.lora)
    times, losses = _timed(_stepper(policy, params.train_reward, batch), device, 2, args.steps)
    median = statistics.median(times)
    mfu = 6 * n * tokens / median / (peak * 1e12)
    report["bf16"] = {"parameters": n, "median_step_s": median, "tokens_per_s": tokens / median,
                      "mfu": mfu, "peak_tflops": peak, "peak_mib": _peak_mib(device), "losses": losses}  # fmt: skip
    print(f"1. bf16 rsa-cvar + LoRA: {n / 1e9:.2f}B parameters, {median:.3f} s/step, {tokens / median:,.0f} "
          f"tokens/s, MFU {mfu:.1%} (6N per token, peak {peak} TFLOPS), peak {_peak_mib(device):,.0f} MiB, "
          f"losses {[round(x, 4) for x in losses]}", flush=True)  # fmt: skip

    # 2. the 4-bit path: save, reload in NF4, LoRA, steps
    with saved as folder:
        del policy, base
        _reset(device)
        quant = QuantizationParams(bits=4, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
        started = time.perf_counter()
        quantized = load_quantized(folder, quant, device, gradient_checkpointing=False)
        loaded = time.perf_counter() - started
        policy4 = attach_lora(quantized, params.train_reward.lora)
        times4, losses4 = _timed(_stepper(policy4, params.train_reward, batch), device, 1, max(2, args.steps // 2))
        ok = all(math.isfinite(x) for x in losses4)
        report["nf4"] = {"load_s": loaded, "median_step_s": statistics.median(times4), "peak_mib": _peak_mib(device),
                         "losses": losses4, "finite": ok}  # fmt: skip
        print(f"2. 4-bit NF4 + LoRA: loaded in {loaded:.1f} s, {statistics.median(times4):.3f} s/step, peak "
              f"{_peak_mib(device):,.0f} MiB, losses {[round(x, 4) for x in losses4]}: "
              f"{'finite' if ok else 'NOT FINITE'}", flush=True)  # fmt: skip
        del policy4, quantized

    # 3. peak memory of one step per method at T = seq
    memory = {}
    for method in METHODS:
        params_m = _params(method, size, args.pairs, seq, precision)
        _reset(device)
        policy_m = attach_lora(_model(params_m, size, device, dtype), params_m.train_reward.lora)
        step = _stepper(policy_m, params_m.train_reward, batch)
        step()
        _reset(device)
        t, _ = _timed(step, device, 0, 2)
        memory[method] = {"peak_mib": _peak_mib(device), "median_step_s": statistics.median(t)}
        del policy_m, step
    base_m = memory["dpo"]
    for method, m in memory.items():
        m["memory_x_dpo"] = m["peak_mib"] / base_m["peak_mib"] if device == "cuda" else float("nan")
        m["time_x_dpo"] = m["median_step_s"] / base_m["median_step_s"]
        print(f"3. {method:9s} peak {m['peak_mib']:,.0f} MiB ({m['memory_x_dpo']:.2f} x dpo), "
              f"{m['median_step_s']:.3f} s/step ({m['time_x_dpo']:.2f} x dpo)", flush=True)  # fmt: skip
    report["memory_by_method"] = memory
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
