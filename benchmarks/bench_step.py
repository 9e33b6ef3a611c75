"""One full training step of rsa-pl's preference methods, against TRL's DPOTrainer.

One step = policy forward + backward, reference forward, loss, gradient clipping and an AdamW
step, on one pre-collated batch of B pairs (2B sequences of prompt + response tokens), for:

- rsa-pl `dpo`, `tdpo`, `rsa-cvar`, `rsa-erm`, built the way `rsa_pl/pipeline/preference.py` builds a
  full-precision LoRA stage 1: the committed `train_reward` section of params.yaml with the
  method's loss/alpha/risk (and batch size) overridden and re-validated, the model from
  `rsa_pl.models.build_scratch_model` (a Llama sized by the bench, random init), the adapter from
  `rsa_pl.models.attach_lora`, and `rsa_pl.modules.PreferenceModule(policy, train,
  section.objective(), reference=None)`, whose reference is the same model with the adapter
  disabled. The step is driven by hand, WITHOUT a Lightning Trainer, in the order Lightning's
  automatic optimization runs it: `module.training_step(batch, i)` (reference forward under
  no_grad in eval mode, policy forward, loss, finiteness check), `loss.backward()`,
  `module.on_before_optimizer_step(optimizer)` (the fused grad-norm / non-finite pass),
  `clip_grad_norm_(gradient_clip_val)`, `optimizer.step()`, `scheduler.step()`, `zero_grad()`.
  Without a Trainer `self.log` returns at once, so Lightning's per-step logging bookkeeping
  (about ten metrics into its result collection) is not timed; neither are the dataloader and
  callbacks (checkpointing every 100 steps in the pipeline).
- `trl-dpo`: `trl.DPOTrainer` (plain sigmoid DPO, `loss_type=["sigmoid"]`) on the same model
  (same builder and seed, so the same initial weights), `peft_config` = the same
  `rsa_pl.models.lora_config` (same r, alpha, dropout, target modules), so TRL wraps the model
  and, with no `ref_model`, takes the reference as the adapter disabled, like rsa-pl;
  `precompute_ref_log_probs=False` (the reference forward runs every step), `use_cpu`, fp32
  (`bf16=False`), `gradient_checkpointing=False`, `dataloader_num_workers=0`, no logging, saving
  or evaluation. The trainer is built on a tiny `datasets.Dataset` of the same pairs as text in
  a word-level tokenizer whose tokens map one-to-one to the ids (TRL tokenizes it itself; the
  bench checks that it gets exactly the same ids back), and the batch is TRL's own collator
  output for those rows. The step is `trainer.training_step(model, batch)` (TRL's
  compute_loss + `accelerator.backward`), then what transformers' training loop does around it:
  `clip_grad_norm_(max_grad_norm)`, `optimizer.step()`, `lr_scheduler.step()`, `zero_grad()`.
  (`trainer.current_gradient_accumulation_steps` is set to 1, as that loop sets it.)

Both sides use the same optimizer: torch AdamW with PreferenceModule.configure_optimizers'
parameter groups, lr and weight decay, and its warmup-cosine schedule (assigned to
`trainer.optimizer` / `trainer.lr_scheduler` on the TRL side); same beta, same gradient clip.
At the first (warm-up) step policy and reference are equal, so every method's loss is ln 2; rsa-pl
`dpo` and `trl-dpo` start from identical weights and optimise the same loss on the same batch,
so their per-step losses must agree (the JSON records both; `meta.dpo_vs_trl_max_loss_diff`).

Differences that remain between the two steps (by design of each library, not of the bench):
- Logits. rsa-pl's policy and reference forwards return the full (2B, T, V) float32 logits (the
  risk measures need every position's full distribution under both models; its dpo path takes
  the same route), then the loss works on response positions block by block. TRL 1.16 patches
  the model with a fused LM head that projects hidden states to log-probs in tiles and returns
  only per-token log-probs (+ entropy, mean logit, top-1 flags for its metrics). On CUDA a
  Triton kernel does that for the completion positions only; on CPU (here) its torch fallback
  scores every position, prompt included, in tiles of up to 4096 positions x 32768 vocabulary
  entries, i.e. at these sizes in one tile, with several full-size float32 temporaries.
- Batch layout: both run ONE policy forward and ONE reference forward on the concatenated
  [chosen; rejected] batch of shape (2B, T), right-padded (here every sequence has the same
  length, so there is no padding on either side); both score the same B x 2 x R response tokens.
- Metrics: TRL computes and gathers its metrics (rewards, logps, entropy, logits, accuracy,
  with .item() calls) inside compute_loss every step; rsa-pl computes its metric tensors but,
  without a Trainer, self.log drops them.

Threads: one torch thread per child by default (--threads). This 2-core machine is shared, and
with two OpenMP threads a step's time swung between 1.2 and 5 s from one step to the next under
a load of ~5 (every parallel region waits for a descheduled thread), for either library; with one
thread they repeat within about 10%. --threads 0 keeps torch's default (2 here), for a
quiet machine. The 1-minute load average is recorded per child and per run.

Allocator: glibc returns every freed block above its mmap threshold (at most 32 MiB) to the
kernel, so each new (rows, V) temporary is page-faulted in again; that is a large share of both
libraries' CPU step at V = 32000 (TRL's most). --keep-heap runs the children with glibc told to
keep freed memory (KEEP_HEAP); the default leaves the environment as a user would have it.

Each measurement runs in a fresh child process (so peak RSS is that step's own), methods
alternate round by round (so drift of the machine hits all alike), and the table reports medians
over rounds of each child's median step time. Memory: peak RSS of the child minus its RSS just
before the first step (model, optimizer, trainer and batch built), i.e. what the steps add; the
total peak RSS is in the JSON. Tokens/s counts every token of the (2B, T) batch (prompt +
response, chosen + rejected), as the pipeline's train/tokens_per_s does.

    python benchmarks/bench_step.py                               # both sizes, B 4, T 64 + 192
    python benchmarks/bench_step.py --rounds 1 --steps 2 --sizes tiny
    python benchmarks/bench_step.py --profile --sizes v32k --methods rsa-cvar trl-dpo

Needs TRL: pip install -e '.[bench]'. Writes benchmarks/results/bench_step.json and .md and prints
the table (--profile instead prints a torch.profiler table of one step and writes nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import write_report  # benchmarks/report.py (scripts run with benchmarks/ on sys.path)

ROOT = Path(__file__).resolve().parent.parent
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
}.items():
    os.environ.setdefault(_name, _value)

# rsa-pl methods: overrides of the committed train_reward section (loss, alpha, risk); None: TRL.
METHODS: dict[str, dict[str, Any] | None] = {
    "dpo": {"loss": "dpo", "alpha": 0.0, "risk": None},
    "tdpo": {"loss": "tdpo", "alpha": 0.5, "risk": {"measure": "kl", "mu": 1.0}},
    "rsa-cvar": {"loss": "rsa", "alpha": 0.5, "risk": {"measure": "cvar", "mu": 0.95}},
    # PreferenceModule(reference_head=True): the reference's logits from its hidden states, by groups
    "rsa-cvar-head": {"loss": "rsa", "alpha": 0.5, "risk": {"measure": "cvar", "mu": 0.95}, "reference_head": True},
    "rsa-erm": {"loss": "rsa", "alpha": 0.5, "risk": {"measure": "erm", "mu": 5.0}},
    "trl-dpo": None,
}
BASELINE = "trl-dpo"
# Two tiny Llamas for a 2-core CPU: the pipeline's own width, and a 32k vocabulary (the size of
# Llama-2's), where the (2B, T, V) logits dominate the step.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 384, "vocab": 2048},
    "v32k": {"hidden_size": 256, "num_layers": 2, "num_heads": 4, "intermediate_size": 768, "vocab": 32000},
}
# Real models' geometries (their config.json), randomly initialised: nothing is downloaded. Each is
# built from its own transformers config class (grouped-query attention, tied embeddings, Qwen2's
# q/k/v biases) and run at the layer counts of --layers (trimmed: 30 layers of a step take minutes
# on 2 cores); the table then fits step time and memory as a + b x layers per method and
# extrapolates them, and their ratios, to the full depth.
GEOMETRIES: dict[str, dict[str, Any]] = {
    "smollm2": {  # HuggingFaceTB/SmolLM2-135M
        "label": "SmolLM2-135M",
        "class": "LlamaConfig",
        "hidden_size": 576,
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "intermediate_size": 1536,
        "vocab": 49152,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
    "qwen05": {  # Qwen/Qwen2.5-0.5B
        "label": "Qwen2.5-0.5B",
        "class": "Qwen2Config",
        "hidden_size": 896,
        "num_layers": 24,
        "num_heads": 14,
        "num_kv_heads": 2,
        "intermediate_size": 4864,
        "vocab": 151936,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
}
# glibc hands large freed blocks (above its mmap threshold, at most 32 MiB) back to the kernel, so
# every new (rows, V) temporary page-faults again; these keep them in the heap (--keep-heap).
KEEP_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 36)}
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2; word t<i> is id i for i >= 3


def _geometry(size: str) -> tuple[dict[str, Any], int] | None:
    """(GEOMETRIES entry, layers) of a size written name@layers, else None (a SIZES entry)."""
    if "@" not in size:
        return None
    name, layers = size.split("@")
    return GEOMETRIES[name], int(layers)


def _vocab(size: str) -> int:
    geometry = _geometry(size)
    return geometry[0]["vocab"] if geometry else SIZES[size]["vocab"]


def _label(size: str) -> str:
    geometry = _geometry(size)
    if geometry:
        g, layers = geometry
        return f"{g['label']} (h {g['hidden_size']}, {layers} of {g['num_layers']} layers, V {g['vocab']})"
    shape = SIZES[size]
    return f"{size} (h {shape['hidden_size']}, {shape['num_layers']} layers, V {shape['vocab']})"


def _geometry_model(size: str, tokenizer):
    """A randomly initialised model of a real geometry, trimmed to its layer count, in float32."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    g, layers = _geometry(size)
    config = getattr(transformers, g["class"])(
        vocab_size=g["vocab"],
        hidden_size=g["hidden_size"],
        num_hidden_layers=layers,
        num_attention_heads=g["num_heads"],
        num_key_value_heads=g["num_kv_heads"],
        intermediate_size=g["intermediate_size"],
        max_position_embeddings=4096,
        rope_theta=g["rope_theta"],
        rms_norm_eps=g["rms_norm_eps"],
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _quiet() -> None:
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*self.log.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _tokenizer(vocab: int):
    """A word-level tokenizer whose word t<i> is token id i: TRL tokenizes text back to exactly our ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {PAD: 0, EOS: 1, UNK: 2, **{f"t{i}": i for i in range(3, vocab)}}
    backend = Tokenizer(models.WordLevel(words, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def _pairs(pairs: int, prompt_len: int, response_len: int, vocab: int) -> list[dict[str, list[int]]]:
    """Random prompt, chosen and rejected ids (seeded); each response ends with EOS (TRL appends one otherwise)."""
    import torch

    generator = torch.Generator().manual_seed(1234)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    eos = 1
    return [
        {"prompt": ids(prompt_len), "chosen": [*ids(response_len - 1), eos], "rejected": [*ids(response_len - 1), eos]}
        for _ in range(pairs)
    ]


def _section_and_model(method: str, size: str, pairs: int, seq: int, tokenizer):
    """The stage section (params.yaml train_reward with the method's overrides, validated) and the model."""
    import torch

    from rsa_pl.models import build_scratch_model
    from rsa_pl.params_file import load_params, parse_params

    raw = load_params(ROOT / "params.yaml").model_dump()
    overrides = METHODS[method] if METHODS[method] is not None else METHODS["dpo"]  # TRL: the dpo section
    raw["train_reward"].update({k: v for k, v in overrides.items() if k != "reference_head"})
    raw["train_reward"]["train"]["batch_size"] = pairs
    if _geometry(size) is None:
        shape = {k: v for k, v in SIZES[size].items() if k != "vocab"}
        max_positions = max(seq, raw["sft"]["model"]["max_positions"])
        raw["sft"]["model"].update(kind="scratch", architecture="llama", max_positions=max_positions, **shape)
    params = parse_params(raw, "params.yaml + bench overrides")
    section = params.train_reward
    assert section.lora is not None, "bench: a LoRA stage 1"
    assert section.quantization is None, "bench: a full-precision stage 1"
    torch.manual_seed(0)
    if _geometry(size) is not None:
        return section, _geometry_model(size, tokenizer)
    return section, build_scratch_model(params.sft.model, tokenizer)


def _optimizer(model, train):
    """PreferenceModule.configure_optimizers' AdamW and schedule (it needs a Trainer for the total steps)."""
    import torch

    from rsa_pl.modules import warmup_cosine

    decay = [w for _, w in model.named_parameters() if w.requires_grad and w.dim() >= 2]
    no_decay = [w for _, w in model.named_parameters() if w.requires_grad and w.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=train.lr)
    total = 1000
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, train.warmup_steps, total))
    return optimizer, schedule


def _rsa_step(method: str, size: str, data: list[dict], seq: int):
    """(step function returning the loss, batch) for an rsa-pl method."""
    import torch
    from transformers import set_seed

    from rsa_pl.data.collate import PreferenceCollator
    from rsa_pl.data.tokenize import IGNORE_INDEX
    from rsa_pl.models import attach_lora
    from rsa_pl.modules import PreferenceModule

    tokenizer = _tokenizer(_vocab(size))
    section, model = _section_and_model(method, size, len(data), seq, tokenizer)
    set_seed(section.train.seed)  # as DPOTrainer does right before wrapping: the same LoRA init
    policy = attach_lora(model, section.lora)  # rsa_pl.pipeline.preference.policy_and_reference, LoRA stage 1
    head = bool(METHODS[method].get("reference_head"))
    module = PreferenceModule(policy, section.train, section.objective(), None, None, "train_reward", head)
    optimizer, schedule = _optimizer(policy, section.train)
    rows = [{"chosen_input_ids": p["prompt"] + p["chosen"], "rejected_input_ids": p["prompt"] + p["rejected"],
             "chosen_labels": [IGNORE_INDEX] * len(p["prompt"]) + p["chosen"],
             "rejected_labels": [IGNORE_INDEX] * len(p["prompt"]) + p["rejected"]} for p in data]  # fmt: skip
    batch = PreferenceCollator(tokenizer.pad_token_id)(rows)
    trainable = [w for w in policy.parameters() if w.requires_grad]
    clip = section.train.gradient_clip_val
    module.on_fit_start()  # model.train()
    calls = iter(range(1 << 30))

    def step() -> float:
        loss = module.training_step(batch, next(calls))
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, batch


def _trl_step(size: str, data: list[dict], seq: int, workdir: str):
    """(step function returning the loss, batch) for TRL's DPOTrainer on the same ids."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rsa_pl.models import lora_config

    tokenizer = _tokenizer(_vocab(size))
    section, model = _section_and_model("trl-dpo", size, len(data), seq, tokenizer)
    train = section.train

    def text(ids: list[int], lead: str = "") -> str:
        return lead + " ".join(tokenizer.convert_ids_to_tokens(ids))

    rows = [{"prompt": text(p["prompt"]), "chosen": text(p["chosen"], " "), "rejected": text(p["rejected"], " ")}
            for p in data]  # fmt: skip
    dataset = Dataset.from_list(rows)
    args = DPOConfig(
        output_dir=workdir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        per_device_train_batch_size=len(data),
        gradient_accumulation_steps=1,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        max_grad_norm=train.gradient_clip_val,
        seed=train.seed,
        beta=section.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=False,
        max_length=None,
        disable_dropout=True,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(section.lora),
    )
    for row, pair in zip(trainer.train_dataset, data, strict=True):  # TRL tokenized our text back to our ids
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
            pair["prompt"],
            pair["chosen"],
            pair["rejected"],
        ), "TRL's tokenization changed the ids"
    assert trainer.ref_model is None, "TRL should take the reference as the adapter disabled"
    assert "ref" not in trainer.model.peft_config, "TRL should take the reference as the adapter disabled"
    assert trainer.args.device.type == "cpu", "TRL should run on the CPU"
    assert all(w.dtype == torch.float32 for w in trainer.model.parameters()), "TRL should run in float32"
    assert not any(getattr(m, "gradient_checkpointing", False) for m in trainer.model.modules()), "no checkpointing"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    trainer.optimizer, trainer.lr_scheduler = _optimizer(trainer.model, train)
    trainer.current_gradient_accumulation_steps = 1  # what transformers' training loop sets
    model = trainer.model
    trainable = [w for w in model.parameters() if w.requires_grad]

    def step() -> float:
        loss = trainer.training_step(model, batch)  # compute_loss + accelerator.backward
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad(set_to_none=True)
        return float(loss)

    return step, batch


def _build(method: str, size: str, pairs: int, prompt_len: int, response_len: int, workdir: str, threads: int):
    import torch

    _quiet()
    if threads > 0:
        torch.set_num_threads(threads)
    data = _pairs(pairs, prompt_len, response_len, _vocab(size))
    seq = prompt_len + response_len
    if METHODS[method] is None:
        return _trl_step(size, data, seq, workdir)
    return _rsa_step(method, size, data, seq)


def _check_batch(batch: dict, pairs: int, seq: int) -> int:
    ids = batch["input_ids"]
    assert tuple(ids.shape) == (2 * pairs, seq), f"batch shape {tuple(ids.shape)}, expected {(2 * pairs, seq)}"
    return int(batch["attention_mask"].sum())


def child(
    method: str, size: str, pairs: int, prompt_len: int, response_len: int, steps: int, warmup: int, threads: int
) -> dict:
    """Time `steps` full training steps after `warmup` ones; peak RSS above the RSS before the first step."""
    import torch

    with tempfile.TemporaryDirectory() as workdir:
        step, batch = _build(method, size, pairs, prompt_len, response_len, workdir, threads)
        tokens = _check_batch(batch, pairs, prompt_len + response_len)
        base_rss = _rss_mib()
        losses = [step() for _ in range(warmup)]
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "time_s": statistics.median(times),
        "step_times_s": times,
        "tokens": tokens,
        "peak_mib": peak_rss - base_rss,
        "peak_rss_mib": peak_rss,
        "base_rss_mib": base_rss,
        "losses": losses,
        "threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],
    }


def profile(method: str, size: str, pairs: int, prompt_len: int, response_len: int, threads: int, rows: int) -> str:
    """A torch.profiler table (self CPU time) of one step after two warm-up steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with tempfile.TemporaryDirectory() as workdir:
        step, _ = _build(method, size, pairs, prompt_len, response_len, workdir, threads)
        step()
        step()
        with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _summary(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    summary: dict[str, dict[str, dict]] = {}
    for size, by_method in runs.items():
        summary[size] = {}
        for method, rs in by_method.items():
            time_s = statistics.median(r["time_s"] for r in rs)
            summary[size][method] = {
                "time_s": time_s,
                "tokens_per_s": rs[0]["tokens"] / time_s,
                "peak_mib": statistics.median(r["peak_mib"] for r in rs),
                "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
                "first_loss": rs[0]["losses"][0],
            }
        base = summary[size].get(BASELINE)
        for values in summary[size].values():
            values["time_ratio"] = values["time_s"] / base["time_s"] if base else None
            values["memory_ratio"] = values["peak_mib"] / base["peak_mib"] if base and base["peak_mib"] > 0 else None
    return summary


def _loss_agreement(runs: dict[str, dict[str, list[dict]]]) -> dict[str, float]:
    """Max |loss difference| between rsa-pl dpo and TRL dpo over the steps of the same round, per size."""
    out = {}
    for size, by_method in runs.items():
        if "dpo" in by_method and BASELINE in by_method:
            diffs = [
                abs(a - b)
                for ra, rb in zip(by_method["dpo"], by_method[BASELINE], strict=True)
                for a, b in zip(ra["losses"], rb["losses"], strict=True)
            ]
            out[size] = max(diffs)
    return out


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b x layers through (layers, value) points: (a, b)."""
    xs, ys = [float(x) for x, _ in points], [y for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def _depth(summary: dict) -> dict[str, dict[str, dict]]:
    """Per real geometry and method: step time and peak memory as a_method + b x layers, then at
    the geometry's full depth, with ratios to dpo and TRL. The methods differ only after the last
    decoder layer (head, loss): their layers run the same forward and backward on the same batch,
    so b is one least-squares slope over every method's points (each method its own intercept).
    Each method's own slope, which differs from b by timing noise, is kept beside it."""
    out: dict[str, dict[str, dict]] = {}
    names = sorted({size.split("@")[0] for size in summary if "@" in size})
    for name in names:
        runs = {int(size.split("@")[1]): by for size, by in summary.items() if size.split("@")[0] == name}
        if len(runs) < 2:
            continue
        full = GEOMETRIES[name]["num_layers"]
        methods = list(next(iter(runs.values())))
        pooled = {}
        for key in ("time_s", "peak_mib"):
            points = {m: [(n, by[m][key]) for n, by in runs.items()] for m in methods}
            centred = [(x - statistics.fmean(px for px, _ in ps), y - statistics.fmean(py for _, py in ps))
                       for ps in points.values() for x, y in ps]  # fmt: skip
            pooled[key] = sum(x * y for x, y in centred) / sum(x * x for x, _ in centred)
        fits = {}
        for method in methods:
            values: dict[str, Any] = {"layers": sorted(runs), "full_layers": full}
            for key, label in (("time_s", "time"), ("peak_mib", "peak")):
                points = [(n, by[method][key]) for n, by in runs.items()]
                b = pooled[key]
                a = statistics.fmean(y for _, y in points) - b * statistics.fmean(x for x, _ in points)
                unit = "s" if label == "time" else "mib"
                values[f"{label}_head_{unit}"] = a
                values[f"{label}_per_layer_{unit}"] = b
                values[f"{label}_per_layer_own_{unit}"] = _fit(points)[1]
                values[f"{label}_full_{unit}"] = a + b * full
            fits[method] = values
        for values in fits.values():
            for base in ("dpo", BASELINE):
                if base in fits:
                    values[f"time_full_x_{base}"] = values["time_full_s"] / fits[base]["time_full_s"]
                    values[f"peak_full_x_{base}"] = values["peak_full_mib"] / fits[base]["peak_full_mib"]
        out[name] = fits
    return out


def _depth_table(depth: dict) -> list[str]:
    if not depth:
        return []
    lines = [
        "",
        "Real geometries at full depth: step time and peak memory fitted as a + b x layers over the "
        "layer counts run (a: each method's embeddings, LM head, loss and optimizer; b: one decoder "
        "layer, one least-squares slope over every method's points, as every method runs the same "
        "layers; each method's own slope is in the JSON), then a + b x (the model's layers). An "
        "extrapolation: attention and MLP cost grow linearly in depth at a fixed sequence length, "
        "the head and the loss do not.",
        "",
        "| geometry | method | a: head + loss (s) | b: per layer (s) | full-depth step (s) | x dpo | x TRL "
        "| a (MiB) | b (MiB) | full-depth peak (MiB) | x dpo | x TRL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(values: dict, key: str) -> str:
        return f"{values[key]:.2f}" if key in values else "-"

    for name, fits in depth.items():
        g = GEOMETRIES[name]
        label = f"{g['label']} ({g['num_layers']} layers, fit over {fits[next(iter(fits))]['layers']})"
        for method, v in fits.items():
            lines.append(
                f"| {label} | {method} | {v['time_head_s']:.3f} | {v['time_per_layer_s']:.3f} | {v['time_full_s']:.2f} "
                f"| {ratio(v, 'time_full_x_dpo')} | {ratio(v, 'time_full_x_' + BASELINE)} | {v['peak_head_mib']:.0f} "
                f"| {v['peak_per_layer_mib']:.0f} | {v['peak_full_mib']:.0f} | {ratio(v, 'peak_full_x_dpo')} "
                f"| {ratio(v, 'peak_full_x_' + BASELINE)} |"
            )
    return lines


def _table(summary: dict, meta: dict) -> str:
    lines = [
        f"One full training step (policy forward + backward, reference forward, loss, clip, AdamW): B = "
        f"{meta['pairs']} pairs, T = {meta['prompt_len']} + {meta['response_len']}, LoRA r {meta['lora_r']} on "
        f"{', '.join(meta['lora_targets'])}, float32 on CPU ({meta['machine']}, {meta['threads']} threads); "
        f"median of {meta['rounds']} alternating child processes of {meta['steps']} timed steps after "
        f"{meta['warmup']} warm-up; tokens/s = all {2 * meta['pairs']} x T batch tokens per step; peak = peak RSS "
        f"above the RSS before the first step; ratios to TRL {meta['trl']} DPOTrainer (sigmoid DPO, reference "
        f"forward every step). torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}; "
        f"1-min load average {meta['loadavg_1min_start_end'][0]:.1f} at the start, "
        f"{meta['loadavg_1min_start_end'][1]:.1f} at the end (a shared machine)"
        + ("; glibc keeping freed memory (--keep-heap)." if meta["keep_heap"] else "."),
        "",
        "| size | method | median step (s) | tokens/s | peak (MiB) | time x dpo | memory x dpo | time x TRL "
        "| memory x TRL |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size, by_method in summary.items():
        label = _label(size)
        dpo = by_method.get("dpo")
        for method, v in by_method.items():
            ratio_t = f"{v['time_ratio']:.2f}" if v["time_ratio"] is not None else "-"
            ratio_m = f"{v['memory_ratio']:.2f}" if v["memory_ratio"] is not None else "-"
            dpo_t = f"{v['time_s'] / dpo['time_s']:.2f}" if dpo else "-"
            dpo_m = f"{v['peak_mib'] / dpo['peak_mib']:.2f}" if dpo and dpo["peak_mib"] > 0 else "-"
            lines.append(
                f"| {label} | {method} | {v['time_s']:.3f} | {v['tokens_per_s']:.0f} | {v['peak_mib']:.0f} "
                f"| {dpo_t} | {dpo_m} | {ratio_t} | {ratio_m} |"
            )
    return "\n".join(lines + _depth_table(meta.get("depth", {})))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="child processes per method and size, alternating")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=[*SIZES, *GEOMETRIES])
    parser.add_argument(
        "--layers", nargs="+", type=int, default=[1, 2], help="layer counts each real geometry (--sizes) runs at"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch", type=int, default=4, help="pairs per step (2x sequences)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--response-len", type=int, default=192)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per child after the warm-up")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per child first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per child; 0: torch's default")
    parser.add_argument(
        "--keep-heap",
        action="store_true",
        help="children keep freed memory in glibc's heap (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_)",
    )
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per method and size")
    parser.add_argument("--profile-rows", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_step")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--render", action="store_true", help="rewrite --out's .md (and fits) from its .json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        saved["meta"]["depth"] = _depth(saved["summary"])
        write_report(args.out, saved, _table(saved["summary"], saved["meta"]))
        return
    if args.response_len < 2 or args.prompt_len < 1:
        parser.error("--prompt-len must be >= 1 and --response-len >= 2")
    shape = (args.batch, args.prompt_len, args.response_len)
    if args.child:
        method, size = args.child
        print(json.dumps(child(method, size, *shape, args.steps, args.warmup, args.threads)))
        return
    if args.profile:
        for size in [f"{s}@{args.layers[0]}" if s in GEOMETRIES else s for s in args.sizes]:
            for method in args.methods:
                print(f"== {method}, {size}, B {args.batch}, T {args.prompt_len} + {args.response_len}")
                print(profile(method, size, *shape, args.threads, args.profile_rows))
        return

    flags = ["--batch", str(args.batch), "--prompt-len", str(args.prompt_len), "--response-len", str(args.response_len)]
    flags += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    sizes = [s for size in args.sizes for s in ([f"{size}@{n}" for n in args.layers] if size in GEOMETRIES else [size])]
    runs: dict[str, dict[str, list[dict]]] = {size: {m: [] for m in args.methods} for size in sizes}
    load_start = os.getloadavg()[0]
    env = {**os.environ, **(KEEP_HEAP if args.keep_heap else {})}
    for round_index in range(args.rounds):
        shift = round_index % len(args.methods)
        order = args.methods[shift:] + args.methods[:shift]
        for size in sizes:
            for method in order:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", method, size, *flags],
                    capture_output=True,
                    text=True,
                    cwd=ROOT,
                    env=env,
                )
                if out.returncode:
                    sys.exit(f"bench_step: child {method} {size} failed:\n{out.stderr[-4000:]}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                runs[size][method].append(result)
                print(
                    f"round {round_index + 1}/{args.rounds} {size} {method}: {result['time_s']:.3f} s, "
                    f"{result['peak_mib']:.0f} MiB, losses {[round(x, 4) for x in result['losses']]}",
                    file=sys.stderr,
                )

    import peft
    import torch
    import transformers

    from rsa_pl.params_file import load_params

    lora = load_params(ROOT / "params.yaml").train_reward.lora
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "(not installed)"
    summary = _summary(runs)
    first = next(iter(next(iter(runs.values())).values()))[0]
    meta = {
        "pairs": args.batch,
        "prompt_len": args.prompt_len,
        "response_len": args.response_len,
        "sizes": {size: SIZES[size] if size in SIZES else GEOMETRIES[size] for size in args.sizes},
        "layers": args.layers,
        "lora_r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_targets": list(lora.target_modules),
        "rounds": args.rounds,
        "steps": args.steps,
        "warmup": args.warmup,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": first["threads"],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "trl": trl_version,
        "loadavg_1min_start_end": [load_start, os.getloadavg()[0]],
        "keep_heap": KEEP_HEAP if args.keep_heap else None,
        "first_step_loss_expected": math.log(2),
        "dpo_vs_trl_max_loss_diff": _loss_agreement(runs),
        "depth": _depth(summary),
    }
    table = _table(summary, meta)
    write_report(args.out, {"meta": meta, "runs": runs, "summary": summary}, table)


if __name__ == "__main__":
    main()
