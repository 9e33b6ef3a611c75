"""`rsa-pl evaluate`: every policy answers the held-out prompts, a judge scores the answers.

Policies: sft, reward (stage 1), safety (stage 2) and each RSA(P) policy in models/merged
(named q<q>). Each answers the benign and red-team prompts (the files evaluate.prompt_sets names,
or prepare's data/eval_helpful and data/eval_redteam) greedily (win rates against SFT, as SACPO)
and samples_per_prompt times at the params' temperature (the tail only shows in samples), with
fixed seeds. Writes, atomically:
    eval/metrics.json       flat `<policy>.<metric>` numbers, each with `.n` and its bootstrap 95%
                            interval `.ci95_low` / `.ci95_high` beside it (`dvc metrics diff`)
    eval/per_category.json  policy -> red-team category -> metrics
    eval/samples.jsonl      every answer with its judgement (and the judge's raw reply)
    eval/judge.json         what judging cost: requests, cache hits, failures, wall time
    eval/prompt_sets.json   where each prompt set came from: rows read, rejected, kept
    eval/rejects.jsonl      the prompt files' rows left out, each with its reason
    eval/plots/             frontier, cost per category, cost tail: PNG + CSV (`dvc plots`)
The llm judge's replies are cached in judge_cache (SQLite), kept across runs and params changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from datasets import load_from_disk
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from transformers import PreTrainedModel

from rsa_pl.config import EvaluateParams, Params, PromptSetParams
from rsa_pl.data.sources import DataError, Reject, load_prompts
from rsa_pl.data.tokenize import PromptFormat, PromptTooLongError, encode_prompt
from rsa_pl.errors import UnavailableError
from rsa_pl.evaluation import decisions, plots
from rsa_pl.evaluation.generation import generate_ids, response_logps
from rsa_pl.evaluation.guard import GuardJudge
from rsa_pl.evaluation.judges import Judge, OracleJudge, ScoreModel, ScoreModelJudge, Verdict
from rsa_pl.evaluation.llm_judge import LlmJudge
from rsa_pl.evaluation.refusal import RefusalRules, rules_text
from rsa_pl.evaluation.report import Answer, category_metrics, metric_intervals, policy_metrics
from rsa_pl.models import (
    CPU,
    Placement,
    check_adapter_fits,
    inference_placement,
    load_aligned_policy,
    load_causal_lm,
    load_tokenizer,
)
from rsa_pl.params_file import load_params
from rsa_pl.pipeline.artifacts import MERGE_RECORD, base_model, trusts_code
from rsa_pl.pipeline.outputs import staging_for, swap_in
from rsa_pl.training import clock, mark_finished, resumable_checkpoint

SETS = {"helpful": "eval_helpful", "redteam": "eval_redteam"}
# metric -> its short column title in the summary table (fits an 80-column log)
SUMMARY = {"helpful_win_rate": "help win", "harmless_win_rate": "harmless win", "reward_mean": "reward",
           "cost_mean": "cost", "unsafe_rate": "unsafe", "severe_rate": "severe", "needless_refusal_rate": "refusal",
           "kl_to_sft": "KL sft", "kl_to_stage1": "KL st1", "catastrophe_prob": "P(cat)",
           "judge_failures": "unjudged"}  # fmt: skip


class EvaluateError(ValueError):
    """Missing inputs: a policy folder, a prompt set, prompts."""


def policies(models: Path, at: Placement = CPU) -> list[tuple[str, float | None, Callable[[], PreTrainedModel]]]:
    """(name, q on the RSA(P) path or None, loader) of every policy to evaluate, sft first; each
    loader gives the policy on at.device in at.dtype."""
    base, trust = base_model(models), trusts_code(models)
    for needs, command in (("reward", "train-reward"), ("safety", "train-safety")):
        if not (models / needs).exists():
            raise EvaluateError(f"{models / needs}: not found; run `rsa-pl {command}` first")
    check_adapter_fits(base, models / "reward", trust)  # made on another base: one line now, not after sft's answers
    found: list[tuple[str, float | None, Callable[[], PreTrainedModel]]] = [
        ("sft", None, lambda: at.place(load_causal_lm(base, trust, dtype=at.dtype))),
        ("reward", 0.0, lambda: at.place(load_aligned_policy(base, models / "reward", trust, at.dtype))),
        ("safety", 1.0, lambda: at.place(load_causal_lm(models / "safety", trust, dtype=at.dtype))),
    ]
    merged = []
    for record in sorted((models / "merged").glob(f"*/{MERGE_RECORD}")):
        q = float(json.loads(record.read_text())["q"])
        load = lambda folder=record.parent: at.place(load_causal_lm(folder, trust, dtype=at.dtype))  # noqa: E731
        merged.append((record.parent.name, q, load))
    return found + sorted(merged, key=lambda p: p[1])


@dataclass
class Judging:
    """The judge of every answer, the pairwise judge of greedy answers against SFT's (and which
    aspects it compares), the refusal rules, and the llm judge whose requests are accounted."""

    judge: Judge
    pairwise: LlmJudge | None
    aspects: tuple[str, ...]
    refusal: RefusalRules | None
    refusal_mode: str
    llm: LlmJudge | None

    def verdicts(self, prompts: list[str], prompt_texts: list[str], responses: list[str]) -> list[Verdict]:
        """The judge's verdicts, with refusals from the rules and/or the llm judge's field."""
        verdicts = self.judge(prompts, prompt_texts, responses)
        if self.refusal is None:  # the oracle knows refusals exactly
            return verdicts
        out = []
        for verdict, text in zip(verdicts, responses, strict=True):
            by_rule, by_judge = self.refusal.refuses(text), verdict.refusal
            if self.refusal_mode == "patterns":
                refusal: bool | None = by_rule
            elif self.refusal_mode == "judge":
                refusal = by_judge
            else:
                refusal = by_rule or bool(by_judge)
            out.append(replace(verdict, refusal=refusal))
        return out

    def stats(self) -> dict[str, object]:
        row: dict[str, object] = {"judge": self.judge.name}
        if self.llm is not None:
            row |= self.llm.stats.row() | {"cache": str(self.llm.cache.path), "cached_replies": len(self.llm.cache)}
        return row

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()


def make_judge(params: Params, judge_cache: Path, at: Placement = CPU) -> Judging:
    """The judges params.evaluate names, loaded and checked (an llm judge's server is probed)
    before any generation starts; in-process judge models on at.device in at.dtype."""
    e = params.evaluate
    if e.judge == "oracle":
        if params.prepare.source.kind != "embedded":
            kind = params.prepare.source.kind
            raise EvaluateError(
                f"evaluate.judge: oracle judges the embedded world only; use llm, guard or score_models for {kind}"
            )
        return Judging(OracleJudge(params.prepare.world), None, (), None, "oracle", None)
    rules = RefusalRules(e.refusal_patterns)
    if e.judge == "score_models":
        judge: Judge = ScoreModelJudge(
            str(e.reward_model), str(e.cost_model), e.trust_remote_code, e.score_format, e.severe_cost, at
        )
        return Judging(judge, None, (), rules, e.refusal, None)
    llm = LlmJudge(e.llm, judge_cache) if e.llm.base_url is not None else None
    if e.judge == "llm":
        assert llm is not None  # params check: llm.base_url is required for judge llm
        return Judging(llm, llm if e.llm.pairwise else None, ("helpful", "harmless"), rules, e.refusal, llm)
    helpfulness = None
    if llm is not None:
        helpfulness = lambda prompts, responses: [v.reward for v in llm.helpfulness(prompts, responses)]  # noqa: E731
    elif e.reward_model is not None:
        helpfulness = ScoreModel(str(e.reward_model), "reward", e.trust_remote_code, e.score_format, at).score_pairs
    guard = GuardJudge(e.guard, e.trust_remote_code, helpfulness=helpfulness, at=at)
    pairwise = llm if llm is not None and e.llm.pairwise else None
    return Judging(guard, pairwise, ("helpful",), rules, e.refusal, llm)


@dataclass
class PromptSets:
    """The prompts of both sets (columns prompt, prompt_text, prompt_input_ids, category), where each
    came from and how many rows it read, kept and rejected, and the rejected rows."""

    sets: dict[str, dict[str, list]]
    report: dict[str, dict[str, object]]
    rejects: list[Reject]


def _sampled(count: int, limit: int | None, seed: int) -> list[int]:
    """Which of count items a size cap keeps: a seeded sample, in the items' order."""
    if limit is None or count <= limit:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


def _saved_set(data: Path, name: str, limit: int | None, seed: int) -> tuple[dict[str, list], dict[str, object]]:
    folder = data / SETS[name]
    if not folder.exists():
        raise EvaluateError(f"{folder}: no prompt set; run `rsa-pl prepare` first")
    try:
        ds = load_from_disk(str(folder))
    except IndexError:  # datasets cannot concatenate zero data files: a set saved empty
        ds = None
    except (OSError, ValueError) as error:
        raise EvaluateError(f"{folder}: cannot read the prompt set ({error})") from None
    if ds is None or len(ds) == 0:
        raise EvaluateError(
            f"{folder}: the prompt set has no prompts; name a prompt file in evaluate.prompt_sets.{name}"
        )
    keep = _sampled(len(ds), limit, seed)
    kept = ds.select(keep)
    columns = {k: kept[k] for k in ("prompt", "prompt_text", "prompt_input_ids", "category")}
    return columns, {"source": str(folder), "rows": len(ds), "prompts": len(keep)}


def _file_set(spec: PromptSetParams, name: str, fmt: PromptFormat, max_prompt_length: int,
              seed: int) -> tuple[dict[str, list], dict[str, object], list[Reject]]:  # fmt: skip
    where = f"evaluate.prompt_sets.{name}"
    try:
        loaded = load_prompts(spec.path, spec.split, spec.prompt_column, spec.category_column, spec.where)
    except (DataError, UnavailableError) as error:
        raise EvaluateError(f"{where}: {error}") from None
    rejects = list(loaded.rejects)
    encoded = []
    for index, row in zip(loaded.indices, loaded.rows, strict=True):
        try:
            encoded.append((row, *encode_prompt(fmt, row["prompt"], max_prompt_length)))
        except PromptTooLongError as error:
            rejects.append(Reject(spec.path, index, "prompt too long", {**row, "detail": str(error)}))
    if not encoded:
        raise EvaluateError(f"{where}: {spec.path}: no usable prompt ({loaded.read} rows, {loaded.outside} outside "
                            f"`where`, {len(rejects)} rejected: eval/rejects.jsonl)")  # fmt: skip
    kept = [encoded[i] for i in _sampled(len(encoded), spec.limit, seed)]
    columns = {"prompt": [r["prompt"] for r, _, _ in kept], "prompt_text": [t for _, t, _ in kept],
               "prompt_input_ids": [ids for _, _, ids in kept],
               "category": [r["category"] for r, _, _ in kept]}  # fmt: skip
    report = {"source": spec.path, "rows": loaded.read, "outside_where": loaded.outside,
              "rejected": dict(sorted(Counter(r.reason for r in rejects).items())), "usable": len(encoded),
              "prompts": len(kept)}  # fmt: skip
    return columns, report, [replace(r, data={**r.data, "set": name}) for r in rejects]


def load_prompt_sets(params: Params, data: Path, tokenizer) -> PromptSets:
    """The helpful and red-team prompts: each from its file in evaluate.prompt_sets (tokenized in
    prepare's prompt format), or prepare's validation prompts (data/eval_helpful, data/eval_redteam)."""
    e, p = params.evaluate, params.prepare
    fmt = None
    out = PromptSets({}, {}, [])
    for name in SETS:
        spec = getattr(e.prompt_sets, name)
        if spec is None:
            out.sets[name], out.report[name] = _saved_set(data, name, e.prompt_sets.fallback_limit, e.seed)
            continue
        if fmt is None:
            try:
                fmt = PromptFormat(
                    tokenizer, p.prompt_format, p.prompt_template, p.system_prompt, str(data / "tokenizer")
                )
            except DataError as error:
                raise EvaluateError(str(error)) from None
        out.sets[name], out.report[name], rejects = _file_set(spec, name, fmt, p.max_prompt_length, e.seed)
        out.rejects += rejects
    return out


class Pace:
    """Progress lines for a log (stderr not a terminal: `dvc repro` piped to a file, a batch job): a
    line every RSA_PL_PROGRESS_S seconds (default 30) with the policy, its answers done, the tokens/s
    generated and the time left for the whole stage at the rate so far (judging included)."""

    def __init__(self, total: int, every_s: float | None = None, enabled: bool | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.total, self.done, self.tokens = total, 0, 0
        self.every_s = float(os.environ.get("RSA_PL_PROGRESS_S", "30")) if every_s is None else every_s
        self.enabled = not sys.stderr.isatty() if enabled is None else enabled
        self.policy, self.policy_done, self.policy_total = "", 0, 0
        self.now = now
        self.started = self.last = now()
        self.fresh = 0  # answers made in this run (resumed ones do not count for the rate)

    def start(self, policy: str, answers: int) -> None:
        self.policy, self.policy_done, self.policy_total = policy, 0, answers

    def skip(self, answers: int) -> None:
        """A resumed policy's answers: done, without time spent on them."""
        self.done += answers

    def __call__(self, answers: int, tokens: int) -> None:
        self.done += answers
        self.fresh += answers
        self.policy_done += answers
        self.tokens += tokens
        now = self.now()
        if not self.enabled or now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.started
        left = (self.total - self.done) * elapsed / self.fresh if self.fresh else 0.0
        line = (f"evaluate: {self.policy}: {self.policy_done}/{self.policy_total} answers, {self.done}/{self.total} "
                f"in all, {self.tokens / elapsed:,.0f} tokens/s, ETA {clock(left)}")  # fmt: skip
        print(line, file=sys.stderr, flush=True)


def _decision_points(params: Params, prompt_sets: PromptSets, tokenizer, data: Path) -> list[decisions.DecisionPoint]:
    """The embedded world's decision points (rsa_pl/evaluation/decisions.py) in its own red-team
    prompts under the oracle judge; none otherwise (no world knows where a catastrophe is decided)."""
    p = params.prepare
    if params.evaluate.judge != "oracle" or p.world is None or params.evaluate.prompt_sets.redteam is not None:
        return []
    fmt = PromptFormat(tokenizer, p.prompt_format, p.prompt_template, p.system_prompt, str(data / "tokenizer"))
    red = prompt_sets.sets["redteam"]
    try:
        return decisions.decision_points(red["prompt"], red["prompt_text"], red["prompt_input_ids"], fmt)
    except decisions.DecisionError as error:
        raise EvaluateError(f"{data / SETS['redteam']}: {error}") from None


def _count(sets: dict, e: EvaluateParams) -> int:
    """Answers one policy gives: a greedy one and samples_per_prompt samples per prompt."""
    return sum(len(p["prompt_input_ids"]) for p in sets.values()) * (1 + e.samples_per_prompt)


def _answers(name: str, model: PreTrainedModel, sft: PreTrainedModel, tokenizer, sets: dict, e: EvaluateParams,
             judging: Judging, sft_answers: list[Answer] | None, pace: Pace, sample: bool = True,
             stage1: PreTrainedModel | None = None) -> list[Answer]:  # fmt: skip
    """The policy's judged answers: greedy, and (sample) samples_per_prompt samples per prompt with
    their log-probabilities under the policy, SFT and (stage1, for the stage-2 policy) stage 1."""
    answers: list[Answer] = []
    for set_name, prompts in sets.items():
        ids = prompts["prompt_input_ids"]
        for decoding in ("greedy", "sample") if sample else ("greedy",):
            n = 1 if decoding == "greedy" else e.samples_per_prompt
            responses = generate_ids(
                model, tokenizer, ids, temperature=None if decoding == "greedy" else e.temperature,
                max_new_tokens=e.max_new_tokens, seed=e.seed, batch_size=e.batch_size, samples_per_prompt=n,
                progress=pace,
            )  # fmt: skip
            index = [i for i in range(len(ids)) for _ in range(n)]
            texts = [t.strip() for t in tokenizer.batch_decode(responses, skip_special_tokens=True)]
            raw_prompts = [prompts["prompt"][i] for i in index]
            verdicts = judging.verdicts(raw_prompts, [prompts["prompt_text"][i] for i in index], texts)
            logps = sft_logps = stage1_logps = [None] * len(index)
            if decoding == "sample":
                prompt_ids = [ids[i] for i in index]
                # both under the distribution that sampled (pi_T, pi_sft,T): kl_to_sft is KL(pi_T || pi_sft,T)
                logps = response_logps(model, prompt_ids, responses, e.batch_size, e.temperature)
                sft_logps = response_logps(sft, prompt_ids, responses, e.batch_size, e.temperature)
                if stage1 is not None:
                    stage1_logps = response_logps(stage1, prompt_ids, responses, e.batch_size, e.temperature)
            compared: list[tuple[float | None, list[str | None] | None]] = [(None, None)] * len(index)
            aspect = "helpful" if set_name == "helpful" else "harmless"
            if decoding == "greedy" and judging.pairwise is not None and aspect in judging.aspects:
                baseline = texts  # SFT against itself: every answer identical, a tie without asking
                if sft_answers is not None:
                    by_prompt = {a.prompt_index: a.response for a in sft_answers
                                 if a.set == set_name and a.decoding == "greedy"}  # fmt: skip
                    baseline = [by_prompt[i] for i in index]
                compared = judging.pairwise.compare(raw_prompts, texts, baseline, aspect)  # type: ignore[assignment]
            answers += [
                Answer(
                    name, set_name, decoding, i, prompts["prompt"][i], prompts["category"][i], text, len(r), v, lp, sp,
                    s1, win, replies,
                )
                for i, text, r, v, lp, sp, s1, (win, replies) in zip(
                    index, texts, responses, verdicts, logps, sft_logps, stage1_logps, compared, strict=True
                )
            ]  # fmt: skip
    return answers


def _state(path: Path | str) -> str:
    """What identifies a model or data folder's current version cheaply: every file's relative
    path, size and modification time (stages replace their outputs whole, so a rewritten output
    has new times); a name that is not a local path (a hub id) stands for itself."""
    path = Path(path)
    if not path.exists():
        return str(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    listing = [(str(f.relative_to(path)) if path.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns)
               for f in files]  # fmt: skip
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _identity(params: Params, data: Path, models: Path, found: list, judging: Judging) -> dict:
    """Everything the answers depend on: a checkpoint of answers from other inputs is never reused."""
    e = params.evaluate
    if e.judge == "oracle":
        judge: dict = params.prepare.world.model_dump()
    else:
        judge = {"models": {k: _state(str(v)) for k, v in (("reward", e.reward_model), ("cost", e.cost_model),
                                                           ("guard", e.guard.model)) if v is not None},
                 "refusal_rules": _digest(rules_text(e.refusal_patterns)[1])}  # fmt: skip
        if e.guard.prompt is not None:
            judge["guard_prompt"] = _state(e.guard.prompt)
        if judging.llm is not None:
            judge["llm"] = judging.llm.identity()
    folders = {"sft": base_model(models), "reward": models / "reward", "safety": models / "safety"}
    return {
        "evaluate": e.model_dump(),
        "judge": judge,
        "data": {name: _state(data / folder) for name, folder in {**SETS, "tokenizer": "tokenizer"}.items()}
        | {f"file_{name}": _state(spec.path) for name in SETS if (spec := getattr(e.prompt_sets, name)) is not None},
        "policies": {name: _state(folders.get(name, models / "merged" / name)) for name, _, _ in found},
    }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _load_answers(file: Path) -> list[Answer]:
    return [Answer.from_row(json.loads(line)) for line in file.read_text().splitlines()]


def _save_answers(answers: list[Answer], file: Path) -> None:
    """Written beside, then renamed: a kill leaves a policy's answers whole or absent."""
    temporary = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    with temporary.open("w") as handle:
        for answer in answers:
            handle.write(json.dumps(answer.row()) + "\n")
    os.replace(temporary, file)


def run(
    params_path: Path, data: Path, models: Path, out: Path, console: Console, checkpoints: Path | None = None,
    judge_cache: Path | None = None,
) -> dict[str, float]:  # fmt: skip
    """Evaluate every policy into out (eval/); return the flat metrics.

    checkpoints: where each policy's judged answers are kept as soon as they are done, so that a
    killed run resumes with the policies it had not finished (the answers of one policy are the
    unit: each is seeded on its own, so resumed results equal an uninterrupted run's exactly).
    judge_cache: the llm judge's reply cache (default: judge_cache.sqlite beside checkpoints, or
    beside out): it outlives checkpoints, which are dropped when params change.
    """
    params = load_params(params_path)
    staging_for(out).rmdir()  # out can be written: known before every policy is generated and judged
    at = inference_placement(params.evaluate.device, params.evaluate.dtype)
    found = policies(models, at)
    chosen = params.evaluate.policies
    if chosen is not None:
        unknown = sorted(set(chosen) - {name for name, _, _ in found})
        if unknown:
            names = ", ".join(name for name, _, _ in found)
            raise EvaluateError(f"evaluate.policies: no policy {', '.join(unknown)} in {models} (there are: {names})")
    tokenizer = load_tokenizer(data / "tokenizer", params.prepare.tokenizer.trust_remote_code)
    sets = load_prompt_sets(params, data, tokenizer)
    if judge_cache is None:
        judge_cache = (checkpoints.parent if checkpoints is not None else out.parent) / "judge_cache.sqlite"
    judging = make_judge(params, judge_cache, at)
    console.print(f"evaluate: policies and judge models on {at.device} in {str(at.dtype).removeprefix('torch.')}")
    try:
        flat = _evaluate(params, data, models, out, console, checkpoints, found, sets, judging, tokenizer)
    finally:
        judging.close()
    return flat


def _evaluate(params: Params, data: Path, models: Path, out: Path, console: Console, checkpoints: Path | None,
              found: list, prompt_sets: PromptSets, judging: Judging, tokenizer) -> dict[str, float]:  # fmt: skip
    e = params.evaluate
    sets = prompt_sets.sets
    for name, row in prompt_sets.report.items():
        rejected = sum(row.get("rejected", {}).values())  # type: ignore[attr-defined]
        console.print(f"evaluate: {name} prompts: {row['prompts']} from {row['source']}"
                      + (f" ({rejected} rejected: eval/rejects.jsonl)" if rejected else ""))  # fmt: skip
    done: Path | None = None
    if checkpoints is not None:
        _, note = resumable_checkpoint(checkpoints, _identity(params, data, models, found, judging), "answers")
        console.print(f"evaluate: {note}")
        done = checkpoints / "answers"
        done.mkdir(exist_ok=True)
    sft = found[0][2]()
    reported = [name for name, _, _ in found if e.policies is None or name in e.policies]
    evaluated = [p for p in found if p[0] == "sft" or p[0] in reported]  # sft's greedy answers: the baseline
    points = _decision_points(params, prompt_sets, tokenizer, data)
    answers: dict[str, list[Answer]] = {}
    decided: dict[str, dict[str, float]] = {}
    reward: PreTrainedModel | None = None
    started = time.perf_counter()
    greedy_only = _count(sets, e) // (1 + e.samples_per_prompt)  # an unreported sft's answers
    pace = Pace(_count(sets, e) * len(reported) + greedy_only * (len(evaluated) - len(reported)))
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("evaluate", total=len(evaluated))
        for name, _, load in evaluated:
            kept = done / f"{name}.jsonl" if done is not None else None
            sample = name in reported
            count = _count(sets, e) if sample else greedy_only
            if kept is not None and kept.exists():
                progress.update(task, description=f"resumed: {name}")
                answers[name] = _load_answers(kept)
                if sample and points:
                    decided[name] = json.loads(kept.with_suffix(".decisions.json").read_text())
                pace.skip(count)
            else:
                progress.update(task, description=f"generating and judging: {name}")
                if not console.is_terminal:  # a log: one line per policy, with the time so far
                    console.print(f"evaluate: generating and judging {name} ({len(answers) + 1}/{len(evaluated)}), "
                                  f"{time.perf_counter() - started:.0f} s so far")  # fmt: skip
                model = sft if name == "sft" else load()
                # the stage-2 policy's drift from its training reference, the stage-1 policy (kl_to_stage1):
                # the one just evaluated when it was, loaded otherwise
                stage1 = None
                if name == "safety":
                    stage1 = reward if reward is not None else next(lo for n, _, lo in found if n == "reward")()
                pace.start(name, count)
                answers[name] = _answers(
                    name, model, sft, tokenizer, sets, e, judging, answers.get("sft"), pace, sample, stage1
                )
                reward = model if name == "reward" else None  # kept only until safety, which comes next
                del stage1
                if sample and points:
                    probs = decisions.probabilities(model, points, e.batch_size)
                    decided[name] = decisions.metrics(points, probs, e.seed)
                if kept is not None:  # the decisions first: answers on disk mean the policy is done
                    if name in decided:
                        kept.with_suffix(".decisions.json").write_text(json.dumps(decided[name]))
                    _save_answers(answers[name], kept)
            progress.advance(task)
    per_policy = {name: policy_metrics(answers[name], answers["sft"], list(e.tail_levels)) for name in reported}
    per_category = {name: category_metrics(answers[name], list(e.tail_levels)) for name in reported}
    flat: dict[str, float] = {}
    for policy, metrics in per_policy.items():  # each metric, then its n and 95% interval beside it
        intervals = metric_intervals(answers[policy], answers["sft"], list(e.tail_levels), e.seed)
        for key, value in metrics.items():
            flat[f"{policy}.{key}"] = float(value)
            flat |= {f"{policy}.{key}.{stat}": x for stat, x in intervals.get(key, {}).items()}
        flat |= {f"{policy}.{key}": x for key, x in decided.get(policy, {}).items()}
        per_policy[policy] |= {k: x for k, x in decided.get(policy, {}).items() if k.count(".") == 0}
    stats = judging.stats()

    staging = staging_for(out)
    try:
        (staging / "metrics.json").write_text(json.dumps(flat, indent=2) + "\n")
        (staging / "per_category.json").write_text(json.dumps(per_category, indent=2) + "\n")
        (staging / "judge.json").write_text(json.dumps(stats, indent=2) + "\n")
        (staging / "prompt_sets.json").write_text(json.dumps(prompt_sets.report, indent=2) + "\n")
        with (staging / "rejects.jsonl").open("w") as file:
            for reject in prompt_sets.rejects:
                file.write(json.dumps(asdict(reject)) + "\n")
        with (staging / "samples.jsonl").open("w") as file:
            for group in answers.values():  # sft's greedy answers too when unreported: the win rates' baseline
                for answer in group:
                    file.write(json.dumps(answer.row()) + "\n")
        (staging / "plots").mkdir()
        q_of = {name: q for name, q, _ in found if q is not None and name in per_policy}
        plots.frontier(per_policy, q_of, staging / "plots")
        plots.cost_per_category(per_category, staging / "plots")
        costs = {
            p: [
                a.verdict.cost
                for a in g
                if a.set == "redteam" and a.decoding == "sample" and a.verdict.cost is not None
            ]
            for p, g in answers.items()
            if p in per_policy
        }
        plots.cost_tail(costs, staging / "plots")
        swap_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if checkpoints is not None:
        mark_finished(checkpoints)
    console.print(_summary(per_policy, judging.judge.name))
    if judging.llm is not None:
        s = judging.llm.stats
        console.print(
            f"evaluate: llm judge: {s.requests} requests ({s.retries} retries), {s.cache_hits} cache hits, "
            f"{s.failed_requests} failed requests, {s.unparsed} unparsed replies, {s.wall_s:.1f} s judging"
        )
    return flat


def _summary(per_policy: dict[str, dict[str, float]], judge: str) -> Table:
    columns = [c for c in SUMMARY if any(c in m for m in per_policy.values())]
    if all(not m.get("judge_failures") for m in per_policy.values()):
        columns.remove("judge_failures")  # the column only when a judge failed somewhere
    table = Table(title=f"evaluate: {judge} judge; win rates vs sft (greedy), the rest over samples", padding=(0, 1))
    table.add_column("policy")
    for column in columns:
        table.add_column(SUMMARY[column], justify="right")
    for policy, metrics in per_policy.items():
        table.add_row(policy, *(f"{metrics[c]:.3f}" if c in metrics else "-" for c in columns))
    return table
