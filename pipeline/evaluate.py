"""`rsa-pl evaluate`: every policy answers the held-out prompts, a judge scores the answers.

Policies: sft, reward (stage 1), safety (stage 2) and each RSA(P) policy in models/merged
(named q<q>). Each answers the benign (data/eval_helpful) and red-team (data/eval_redteam)
prompts greedily (win rates against SFT, as SACPO) and samples_per_prompt times at the
params' temperature (the tail only shows in samples), with fixed seeds. Writes, atomically:
    eval/metrics.json       flat `<policy>.<metric>` numbers (`dvc metrics diff`)
    eval/per_category.json  policy -> red-team category -> metrics
    eval/samples.jsonl      every answer with its judgement
    eval/plots/             frontier, cost per category, cost tail: PNG + CSV (`dvc plots`)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from datasets import load_from_disk
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import AutoTokenizer, PreTrainedModel

from pipeline.merge import RECORD as MERGE_RECORD
from pipeline.outputs import staging_for, swap_in
from pipeline.preference import base_model
from rsa_pl.config import EvaluateParams, Params, load_params
from rsa_pl.evaluation import plots
from rsa_pl.evaluation.generation import generate_ids, response_logps
from rsa_pl.evaluation.judges import Judge, OracleJudge, ScoreModelJudge
from rsa_pl.evaluation.report import Answer, category_metrics, policy_metrics
from rsa_pl.models import load_aligned_policy, load_causal_lm

SETS = {"helpful": "eval_helpful", "redteam": "eval_redteam"}
# metric -> its short column title in the summary table (fits an 80-column log)
SUMMARY = {"helpful_win_rate": "help win", "harmless_win_rate": "harmless win", "reward_mean": "reward",
           "cost_mean": "cost", "unsafe_rate": "unsafe", "severe_rate": "severe", "needless_refusal_rate": "refusal",
           "kl_to_sft": "KL sft"}  # fmt: skip


class EvaluateError(ValueError):
    """Missing inputs: a policy folder, a prompt set, prompts."""


def policies(models: Path) -> list[tuple[str, float | None, Callable[[], PreTrainedModel]]]:
    """(name, q on the RSA(P) path or None, loader) of every policy to evaluate, sft first."""
    base = base_model(models)
    for needs, command in (("reward", "train-reward"), ("safety", "train-safety")):
        if not (models / needs).exists():
            raise EvaluateError(f"{models / needs}: not found; run `rsa-pl {command}` first")
    found: list[tuple[str, float | None, Callable[[], PreTrainedModel]]] = [
        ("sft", None, lambda: load_causal_lm(base)),
        ("reward", 0.0, lambda: load_aligned_policy(base, models / "reward")),
        ("safety", 1.0, lambda: load_causal_lm(models / "safety")),
    ]
    merged = []
    for record in sorted((models / "merged").glob(f"*/{MERGE_RECORD}")):
        q = float(json.loads(record.read_text())["q"])
        merged.append((record.parent.name, q, lambda folder=record.parent: load_causal_lm(folder)))
    return found + sorted(merged, key=lambda p: p[1])


def make_judge(params: Params) -> Judge:
    e = params.evaluate
    if e.judge == "oracle":
        if params.prepare.source.kind != "embedded":
            kind = params.prepare.source.kind
            raise EvaluateError(f"evaluate.judge: oracle judges the embedded world only; use score_models for {kind}")
        return OracleJudge(params.prepare.world)
    return ScoreModelJudge(str(e.reward_model), str(e.cost_model))


def _prompt_sets(data: Path) -> dict[str, dict[str, list]]:
    sets = {}
    for name, folder in SETS.items():
        if not (data / folder).exists():
            raise EvaluateError(f"{data / folder}: no prompt set; run `rsa-pl prepare` first")
        try:
            ds = load_from_disk(str(data / folder))
        except IndexError:  # datasets cannot concatenate zero data files: a set saved empty
            raise EvaluateError(f"{data / folder}: the prompt set has no prompts") from None
        except (OSError, ValueError) as error:
            raise EvaluateError(f"{data / folder}: cannot read the prompt set ({error})") from None
        if len(ds) == 0:
            raise EvaluateError(f"{data / folder}: the prompt set has no prompts")
        sets[name] = {k: ds[k] for k in ("prompt", "prompt_text", "prompt_input_ids", "category")}
    return sets


def _answers(name: str, model: PreTrainedModel, sft: PreTrainedModel, tokenizer, sets: dict, e: EvaluateParams,
             judge: Judge) -> list[Answer]:  # fmt: skip
    answers: list[Answer] = []
    for set_name, prompts in sets.items():
        ids = prompts["prompt_input_ids"]
        for decoding in ("greedy", "sample"):
            n = 1 if decoding == "greedy" else e.samples_per_prompt
            responses = generate_ids(
                model, tokenizer, ids, temperature=None if decoding == "greedy" else e.temperature,
                max_new_tokens=e.max_new_tokens, seed=e.seed, batch_size=e.batch_size, samples_per_prompt=n,
            )  # fmt: skip
            index = [i for i in range(len(ids)) for _ in range(n)]
            texts = [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
            verdicts = judge([prompts["prompt"][i] for i in index], [prompts["prompt_text"][i] for i in index], texts)
            logps = sft_logps = [None] * len(index)
            if decoding == "sample":
                prompt_ids = [ids[i] for i in index]
                logps = response_logps(model, prompt_ids, responses, e.batch_size)
                sft_logps = response_logps(sft, prompt_ids, responses, e.batch_size)
            answers += [
                Answer(
                    name, set_name, decoding, i, prompts["prompt"][i], prompts["category"][i], text, len(r), v, lp, sp
                )
                for i, text, r, v, lp, sp in zip(index, texts, responses, verdicts, logps, sft_logps, strict=True)
            ]
    return answers


def run(params_path: Path, data: Path, models: Path, out: Path, console: Console) -> dict[str, float]:
    """Evaluate every policy into out (eval/); return the flat metrics."""
    params = load_params(params_path)
    e = params.evaluate
    found = policies(models)
    sets = _prompt_sets(data)
    judge = make_judge(params)
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    sft = found[0][2]()
    answers: dict[str, list[Answer]] = {}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluate", total=len(found))
        for name, _, load in found:
            progress.update(task, description=f"generating and judging: {name}")
            model = sft if name == "sft" else load()
            answers[name] = _answers(name, model, sft, tokenizer, sets, e, judge)
            progress.advance(task)
    per_policy = {name: policy_metrics(a, answers["sft"], list(e.tail_levels)) for name, a in answers.items()}
    per_category = {name: category_metrics(a, list(e.tail_levels)) for name, a in answers.items()}
    flat = {f"{p}.{k}": float(v) for p, m in per_policy.items() for k, v in m.items()}

    staging = staging_for(out)
    try:
        (staging / "metrics.json").write_text(json.dumps(flat, indent=2) + "\n")
        (staging / "per_category.json").write_text(json.dumps(per_category, indent=2) + "\n")
        with (staging / "samples.jsonl").open("w") as file:
            for group in answers.values():
                for answer in group:
                    file.write(json.dumps(answer.row()) + "\n")
        (staging / "plots").mkdir()
        q_of = {name: q for name, q, _ in found if q is not None}
        plots.frontier(per_policy, q_of, staging / "plots")
        plots.cost_per_category(per_category, staging / "plots")
        costs = {
            p: [a.verdict.cost for a in g if a.set == "redteam" and a.decoding == "sample"] for p, g in answers.items()
        }
        plots.cost_tail(costs, staging / "plots")
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(_summary(per_policy, judge.name))
    return flat


def _summary(per_policy: dict[str, dict[str, float]], judge: str) -> Table:
    columns = [c for c in SUMMARY if any(c in m for m in per_policy.values())]
    table = Table(title=f"evaluate: {judge} judge; win rates vs sft (greedy), the rest over samples", padding=(0, 1))
    table.add_column("policy")
    for column in columns:
        table.add_column(SUMMARY[column], justify="right")
    for policy, metrics in per_policy.items():
        table.add_row(policy, *(f"{metrics[c]:.3f}" if c in metrics else "-" for c in columns))
    return table
