"""Requests per second of the llm judge against a real local `transformers serve`, at concurrency 1
and 8 in the same run (the ratio is the point), then the same requests again from the cache.

    python benchmarks/judge_throughput.py                   # a tiny judge model built here
    python benchmarks/judge_throughput.py --model FOLDER    # any local chat model folder

Each request is the shipped per-answer prompt (~1,400 tokens of the tiny model's tokenizer) over a
distinct (prompt, answer); the reply is capped at --max-tokens. Prints one table row per setting.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsa_pl.config import LlmJudgeParams
from rsa_pl.evaluation.llm_judge import LlmJudge
from tests.judge_server import Served, tiny_judge_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a local chat model folder (default: a tiny one built here)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_judge_model(Path(tmp) / "judge")
        server = Served(model).start()
        try:
            print("| setting | requests | sent | cache hits | wall s | requests/s | vs concurrency 1 |")
            print("|---|---:|---:|---:|---:|---:|---:|")
            base = None
            for concurrency in (1, 8):
                params = LlmJudgeParams(
                    base_url=server.base_url, model=str(model), api_key_env=None, max_concurrency=concurrency,
                    timeout_s=120.0, retries=2, temperature=0.0, max_tokens=args.max_tokens, pairwise=True,
                    prompts=None,
                )  # fmt: skip
                cache = Path(tmp) / f"cache-{concurrency}.sqlite"
                n = args.requests
                prompts = [f"Question {i} of concurrency {concurrency}: how do I keep tulips?" for i in range(n)]
                answers = [f"Plant them {i} cm deep in autumn." for i in range(args.requests)]
                for label in (f"concurrency {concurrency}", f"concurrency {concurrency}, rerun from cache"):
                    judge = LlmJudge(params, cache)
                    start = time.perf_counter()
                    judge(prompts, prompts, answers)
                    wall = time.perf_counter() - start
                    rate = args.requests / wall
                    if base is None:
                        base = rate
                    s = judge.stats
                    print(f"| {label} | {args.requests} | {s.requests} | {s.cache_hits} | {wall:.2f} | {rate:.1f} "
                          f"| {rate / base:.2f}x |")  # fmt: skip
                    judge.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
