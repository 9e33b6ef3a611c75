"""evaluate's generation throughput against plain `model.generate` with the same settings.

rsa-pl side: `rsa_pl.evaluation.generation.generate_ids`, exactly as the evaluate stage calls it
(left padding, KV cache, `samples_per_prompt` samples per prompt via num_return_sequences, one
seed per batch, EOS or max_new_tokens, responses cut at EOS). Plain side: what a user would
write with transformers alone for the same job: for every prompt, `model.generate` on that
prompt with the same sampling settings and num_return_sequences (no batching across prompts,
so no padding). A second plain baseline, `plain-batched`, is transformers' generate on the same
left-padded batches without rsa-pl's wrapper (the wrapper's own overhead).

Both run in this process, alternating round by round on the same randomly initialised Llama
(the pipeline's width, and one with a 32k vocabulary), on the same prompts of varied length.
Throughput = generated tokens (up to and including EOS) per second; prompts are not counted.

    python benchmarks/bench_generate.py                    # both sizes, 48 prompts x 4 samples
    python benchmarks/bench_generate.py --sizes tiny --rounds 2

Writes benchmarks/results/bench_generate.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from report import write_report  # benchmarks/report.py (scripts run with benchmarks/ on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rsa_pl.evaluation.generation import generate_ids

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 384,
             "vocab_size": 2048},
    "v32k": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 768,
             "vocab_size": 32000},
}  # fmt: skip
METHODS = ("rsa-pl", "plain-per-prompt", "plain-batched")
BASELINE = "plain-per-prompt"


class _Ids:
    """The few tokenizer attributes generate_ids reads."""

    pad_token_id, eos_token_id = 0, 1


def _prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, 41, (count,), generator=generator).tolist()  # like the world's prompts
    return [torch.randint(2, vocab, (n,), generator=generator).tolist() for n in lengths]


def _cut(rows: list[list[int]], eos: int) -> list[list[int]]:
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def _plain_per_prompt(model, prompts, settings) -> list[list[int]]:
    out = []
    for index, prompt in enumerate(prompts):
        torch.manual_seed(settings["seed"] + index)
        ids = torch.tensor([prompt])
        tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=settings["new"],
                                eos_token_id=1, pad_token_id=0, num_return_sequences=settings["samples"],
                                do_sample=True, temperature=1.0, top_k=0, top_p=1.0)  # fmt: skip
        out += _cut(tokens[:, len(prompt) :].tolist(), 1)
    return out


def _plain_batched(model, prompts, settings) -> list[list[int]]:
    out = []
    per_batch = max(1, settings["batch"] // settings["samples"])
    for index, start in enumerate(range(0, len(prompts), per_batch)):
        batch = prompts[start : start + per_batch]
        longest = max(len(p) for p in batch)
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
        torch.manual_seed(settings["seed"] + index)
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings["new"], eos_token_id=1,
                                pad_token_id=0, num_return_sequences=settings["samples"], do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0)  # fmt: skip
        out += _cut(tokens[:, longest:].tolist(), 1)
    return out


def _ours(model, prompts, settings) -> list[list[int]]:
    return generate_ids(
        model, _Ids(), prompts, temperature=1.0, max_new_tokens=settings["new"],  # type: ignore[arg-type]
        seed=settings["seed"], batch_size=settings["batch"], samples_per_prompt=settings["samples"],
    )  # fmt: skip


RUNNERS = {"rsa-pl": _ours, "plain-per-prompt": _plain_per_prompt, "plain-batched": _plain_batched}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = {"new": args.max_new_tokens, "samples": args.samples, "batch": args.batch, "seed": 0}
    results = []
    for size in args.sizes:
        torch.manual_seed(0)
        config = LlamaConfig(**SIZES[size], max_position_embeddings=256, bos_token_id=2, eos_token_id=1,
                             pad_token_id=0)  # fmt: skip
        model = LlamaForCausalLM(config).eval()
        prompts = _prompts(args.prompts, SIZES[size]["vocab_size"])
        _ours(model, prompts[: args.batch // args.samples], settings)  # warm-up
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        tokens: dict[str, int] = {}
        for _ in range(args.rounds):
            for method in METHODS:
                started = time.perf_counter()
                responses = RUNNERS[method](model, prompts, settings)
                times[method].append(time.perf_counter() - started)
                tokens[method] = sum(len(r) for r in responses)
        for method in METHODS:
            seconds = statistics.median(times[method])
            results.append({"size": size, "method": method, "median_s": seconds, "tokens": tokens[method],
                            "tokens_per_s": tokens[method] / seconds, "rounds_s": times[method]})  # fmt: skip
        base = next(r for r in results if r["size"] == size and r["method"] == BASELINE)
        for r in results:
            if r["size"] == size:
                r["throughput_x_plain"] = r["tokens_per_s"] / base["tokens_per_s"]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "prompts": args.prompts, "samples_per_prompt": args.samples,
            "batch_size": args.batch, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
            "load_average": os.getloadavg()[0]}  # fmt: skip
    return {"meta": meta, "results": results}


def table(report: dict) -> str:
    m = report["meta"]
    lines = [
        f"Generation: {m['prompts']} prompts x {m['samples_per_prompt']} samples, up to {m['max_new_tokens']} new "
        f"tokens, batch {m['batch_size']}, temperature 1, float32 on CPU ({m['machine']}); median of {m['rounds']} "
        "alternating rounds.",
        "",
        "| size | method | time (s) | generated tokens | tokens/s | x plain per prompt |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(f"| {r['size']} | {r['method']} | {r['median_s']:.2f} | {r['tokens']} | {r['tokens_per_s']:.0f} "
                     f"| {r['throughput_x_plain']:.2f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (evaluate.samples_per_prompt)")
    parser.add_argument("--batch", type=int, default=64, help="prompts x samples per batch (evaluate.batch_size)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    report = run(parser.parse_args())
    write_report(parser.parse_args().out / "bench_generate", report, table(report))


if __name__ == "__main__":
    main()
