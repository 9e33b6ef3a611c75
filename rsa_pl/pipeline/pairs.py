"""`rsa-pl make-pairs`: preference pairs made on-policy from prompts alone (source prompts), as Safe
RLHF collected its data: the base model (models/sft) answers each prompt k times (seeded sampling),
a judge (pairs.judge: llm, guard or score_models, configured under evaluate) scores every answer,
and per prompt the answers with the highest and the lowest reward make a helpfulness pair and those
with the lowest and the highest cost a safety pair. Equal scores make no pair (counted as ties),
nor do answers the judge could not score.

The pairs keep the sampled tokens themselves (prompt ids + answer ids, EOS included when the model
stopped), so the preference stages train on exactly what the policy produced; an answer cut at
pairs.max_new_tokens is counted as truncated. Writes pairs/helpful_pairs and pairs/safety_pairs
(train: the prepared train prompts; validation: the held-out ones) and pairs/report.json
atomically. Judged answers are kept per chunk of prompts in checkpoints: a killed run resumes with
the chunks it had not finished. For a source with its own pairs (embedded, pku_saferlhf, hh,
jsonl) there is nothing to do: the report says so and the preference stages read data/.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from datasets import DatasetDict, load_from_disk
from rich.console import Console

from rsa_pl.config import Params
from rsa_pl.data.tokenize import IGNORE_INDEX
from rsa_pl.evaluation.generation import generate_ids
from rsa_pl.models import Placement, inference_placement, load_causal_lm, load_tokenizer
from rsa_pl.params_file import load_params
from rsa_pl.pipeline.artifacts import base_model, trusts_code
from rsa_pl.pipeline.evaluate import Judging, make_judge
from rsa_pl.pipeline.outputs import staging_for, swap_in
from rsa_pl.pipeline.prepare import FEATURES, as_dataset
from rsa_pl.training import mark_finished, resumable_checkpoint

RULES = {"helpful_pairs": ("reward", True), "safety_pairs": ("cost", False)}  # score, higher is chosen


def run(params_path: Path, data: Path, models: Path, out: Path, console: Console, checkpoints: Path,
        judge_cache: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Make the pairs into out (pairs/); return the report."""
    params = load_params(params_path)
    checkpoints.mkdir(parents=True, exist_ok=True)  # declared by dvc.yaml, whatever the source
    staging = staging_for(out)
    try:
        if params.prepare.source.kind != "prompts":
            report: dict[str, Any] = {"source": params.prepare.source.kind,
                                      "pairs": f"{data}: the source's own (nothing to make)"}  # fmt: skip
        else:
            report = _make(params, data, models, staging, console, checkpoints, judge_cache)
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


JUDGE_KEYS = (
    "llm",
    "guard",
    "reward_model",
    "cost_model",
    "score_format",
    "severe_cost",
    "trust_remote_code",
    "refusal",
    "refusal_patterns",
    "device",
    "dtype",
)
"""The evaluate params the pairs stage uses (dvc.yaml lists them as its params; its checkpoints'
identity holds them): the judge's, and where models run. Not the eval sets or eval sampling."""


def _judging(params: Params, judge_cache: Path, at: Placement) -> Judging:
    """evaluate's judge, named by pairs.judge (its models and server configured under evaluate)."""
    view = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"judge": params.pairs.judge})})
    return make_judge(view, judge_cache, at)


def _make(params: Params, data: Path, models: Path, staging: Path, console: Console, checkpoints: Path,
          judge_cache: Path | None) -> dict[str, Any]:  # fmt: skip
    p = params.pairs
    if not (data / "prompts").exists():
        raise ValueError(f"{data / 'prompts'}: no prompt set; run `rsa-pl prepare` first")
    prompts = load_from_disk(str(data / "prompts"))
    identity = {"pairs": p.model_dump(), "judge": params.evaluate.model_dump(include=set(JUDGE_KEYS)),
                "prepare": params.prepare.model_dump(), "sft": params.sft.model_dump()}  # fmt: skip
    _, note = resumable_checkpoint(checkpoints, identity, "chunks")
    console.print(f"pairs: {note}")
    chunks = checkpoints / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    at = inference_placement(params.evaluate.device, params.evaluate.dtype)
    judging = _judging(params, judge_cache or checkpoints.parent / "judge_cache.sqlite", at)
    started = time.perf_counter()
    try:
        tokenizer = load_tokenizer(data / "tokenizer", params.prepare.tokenizer.trust_remote_code)
        model = at.place(load_causal_lm(base_model(models), trusts_code(models), dtype=at.dtype))
        judged = {split: _judged(split, prompts[split], model, tokenizer, judging, p, chunks, console)
                  for split in ("train", "validation")}  # fmt: skip
        stats = judging.stats()
    finally:
        judging.close()
    report: dict[str, Any] = {"source": "prompts", "samples_per_prompt": p.samples_per_prompt, "judge": stats,
                              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    for name, (field, higher) in RULES.items():
        splits, counts = {}, {}
        for split, groups in judged.items():
            examples, kept = _pairs(groups, field, higher, params.prepare.max_length)
            splits[split] = as_dataset(examples, FEATURES["pairs"])
            counts[split] = kept
        DatasetDict(splits).save_to_disk(str(staging / name), num_shards=dict.fromkeys(splits, 1))
        report[name] = counts
    answers = [a for groups in judged.values() for group in groups for a in group["answers"]]
    report["answers"] = {"total": len(answers), "truncated": sum(a["truncated"] for a in answers),
                         "unjudged": sum(a["reward"] is None or a["cost"] is None for a in answers),
                         "unsafe": sum(bool(a["unsafe"]) for a in answers)}  # fmt: skip
    mark_finished(checkpoints)
    console.print(f"pairs: {json.dumps({k: report[k] for k in ('helpful_pairs', 'safety_pairs', 'answers')})}")
    return report


def _judged(split: str, prompts: Any, model: Any, tokenizer: Any, judging: Judging, p: Any, chunks: Path,
            console: Console) -> list[dict[str, Any]]:  # fmt: skip
    """Per prompt of the split: its row and its k judged answers; chunk by chunk, each kept on disk."""
    groups: list[dict[str, Any]] = []
    for start in range(0, len(prompts), p.chunk):
        kept = chunks / f"{split}-{start:08d}.jsonl"
        if kept.exists():
            groups += [json.loads(line) for line in kept.read_text().splitlines()]
            continue
        rows = prompts.select(range(start, min(start + p.chunk, len(prompts))))
        ids, texts_in, categories = (list(rows[c]) for c in ("prompt_input_ids", "prompt_text", "category"))
        asked = list(rows["prompt"])  # each column read once, not per answer
        answers = generate_ids(
            model, tokenizer, ids, temperature=p.temperature, max_new_tokens=p.max_new_tokens, seed=p.seed + start,
            batch_size=p.batch_size, samples_per_prompt=p.samples_per_prompt,
        )  # fmt: skip
        texts = [t.strip() for t in tokenizer.batch_decode(answers, skip_special_tokens=True)]
        index = [i for i in range(len(ids)) for _ in range(p.samples_per_prompt)]
        verdicts = judging.verdicts([asked[i] for i in index], [texts_in[i] for i in index], texts)
        done = []
        for i in range(len(ids)):
            mine = range(i * p.samples_per_prompt, (i + 1) * p.samples_per_prompt)
            done.append({
                "prompt": asked[i], "prompt_text": texts_in[i], "prompt_ids": ids[i], "category": categories[i],
                "answers": [{"text": texts[j], "ids": answers[j], "reward": verdicts[j].reward,
                             "cost": verdicts[j].cost, "unsafe": verdicts[j].unsafe,
                             "truncated": tokenizer.eos_token_id not in answers[j]} for j in mine],
            })  # fmt: skip
        temporary = kept.with_name(f".{kept.name}.tmp")
        temporary.write_text("".join(json.dumps(g) + "\n" for g in done))
        temporary.replace(kept)  # a chunk is whole or absent
        console.print(f"pairs: {split} prompts {start + len(done)}/{len(prompts)} answered and judged")
        groups += done
    return groups


def _pairs(groups: list[dict[str, Any]], field: str, higher: bool, max_length: int
           ) -> tuple[list[dict[str, Any]], dict[str, int]]:  # fmt: skip
    """One pair per prompt: the answer with the best score chosen, the worst rejected (higher
    reward, or lower cost); a tie between them, or fewer than two scored answers, makes none."""
    examples: list[dict[str, Any]] = []
    kept = {"pairs": 0, "ties": 0, "too_few_scored": 0, "identical": 0}
    for group in groups:
        scored = [a for a in group["answers"] if a[field] is not None]
        if len(scored) < 2:
            kept["too_few_scored"] += 1
            continue
        ordered = sorted(scored, key=lambda a: a[field], reverse=higher)
        best, worst = ordered[0], ordered[-1]
        if best[field] == worst[field]:
            kept["ties"] += 1
            continue
        if best["text"] == worst["text"]:
            kept["identical"] += 1
            continue
        prompt_ids = group["prompt_ids"]
        room = max(0, max_length - len(prompt_ids))
        sides = (("chosen", best), ("rejected", worst))
        safe = {side: None if a["unsafe"] is None else not a["unsafe"] for side, a in sides}
        row: dict[str, Any] = {"prompt": group["prompt"], "prompt_text": group["prompt_text"],
                               "chosen": best["text"], "rejected": worst["text"], "category": group["category"],
                               "is_chosen_safe": safe["chosen"], "is_rejected_safe": safe["rejected"]}  # fmt: skip
        for side, answer in sides:
            response = answer["ids"][:room]
            row[f"{side}_input_ids"] = prompt_ids + response
            row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + response
        examples.append(row)
        kept["pairs"] += 1
    return examples, kept
