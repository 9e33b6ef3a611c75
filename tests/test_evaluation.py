"""The evaluate stage: metric functions against hand-computed values, the judges (oracle and
score models built from configs), the whole command and its output schema, bad input."""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset, load_from_disk
from rich.console import Console
from typer.testing import CliRunner

from rsa_pl.errors import UnavailableError
from rsa_pl.evaluation.bootstrap import resample_weights
from rsa_pl.evaluation.judges import JudgeError, ScoreModel, ScoreModelJudge, Verdict
from rsa_pl.evaluation.metrics import sampled_kl, upper_cvar, win_rate
from rsa_pl.evaluation.report import Answer, category_metrics, metric_intervals, policy_metrics
from rsa_pl.models import Placement, inference_placement
from rsa_pl.pipeline import evaluate, merge, preference
from rsa_pl.pipeline.cli import app
from tests.helpers import ROOT, TEXTS, classifier_score_model, safe_rlhf_score_model, stage_params

QUIET = Console(quiet=True)


def test_win_rate_counts_ties_as_half() -> None:
    assert win_rate([2, 2, 5], [1, 2, 3]) == pytest.approx(2.5 / 3)
    assert win_rate([2, 2, 5], [1, 2, 3], higher_is_better=False) == pytest.approx(0.5 / 3)
    assert win_rate([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="3 policy scores but 2 baseline"):
        win_rate([1, 2, 3], [1, 2])


@pytest.mark.parametrize(
    ("level", "expected"),
    [(1.0, 5.5), (0.1, 10.0), (0.25, (10 + 9 + 0.5 * 8) / 2.5), (0.05, 10.0), (0.5, (10 + 9 + 8 + 7 + 6) / 5)],
)
def test_upper_cvar_of_a_known_list(level: float, expected: float) -> None:
    values = [3.0, 1.0, 4.0, 10.0, 5.0, 9.0, 2.0, 6.0, 8.0, 7.0]
    assert upper_cvar(values, level) == pytest.approx(expected)


def test_upper_cvar_limits() -> None:
    values = [0.0] * 95 + [30.0] * 5  # a rare catastrophic tail: 5% of answers cost 30
    assert upper_cvar(values, 1.0) == pytest.approx(1.5)  # the mean hides it
    assert upper_cvar(values, 0.05) == pytest.approx(30.0)  # the 5% tail is all of it
    assert upper_cvar(values, 0.1) == pytest.approx(15.0)
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\]"):
        upper_cvar(values, 0.0)


def test_sampled_kl_is_the_mean_log_ratio() -> None:
    assert sampled_kl([-1.0, -2.0], [-1.5, -4.0]) == pytest.approx((0.5 + 2.0) / 2)


def answer(policy: str, set_: str, decoding: str, index: int, category: str | None, cost: float, reward: float = 0.0,
           severe: bool = False, refusal: bool = False) -> Answer:  # fmt: skip
    verdict = Verdict(reward, cost, cost > 0, severe, refusal)
    return Answer(policy, set_, decoding, index, f"p{index}", category, "text", 3, verdict, -1.0, -1.5)


def test_policy_and_category_metrics_by_hand() -> None:
    sft = [answer("sft", "helpful", "greedy", i, None, 0.0, reward=1.0) for i in range(2)]
    sft += [answer("sft", "redteam", "greedy", i, "Crime", 1.0) for i in range(2)]
    mine = [answer("p", "helpful", "greedy", 0, None, 0.0, reward=2.0)]
    mine += [answer("p", "helpful", "greedy", 1, None, 0.0, reward=1.0)]
    mine += [answer("p", "redteam", "greedy", 0, "Crime", 0.0), answer("p", "redteam", "greedy", 1, "Insult", 3.0)]
    mine += [answer("p", "helpful", "sample", 0, None, 0.0, reward=1.0, refusal=True)]
    mine += [answer("p", "helpful", "sample", 1, None, 0.0, reward=3.0)]
    mine += [answer("p", "redteam", "sample", 0, "Crime", c) for c in (0.0, 0.0, 1.0)]
    mine += [answer("p", "redteam", "sample", 1, "Insult", c, severe=c == 30.0) for c in (0.0, 30.0, 0.0)]
    m = policy_metrics(mine, sft, [0.5])
    assert m["helpful_win_rate"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["harmless_win_rate"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["reward_mean"] == pytest.approx(2.0)
    assert m["cost_mean"] == pytest.approx(31.0 / 6)
    assert m["unsafe_rate"] == pytest.approx(2 / 6)
    assert m["cost_cvar_0_5"] == pytest.approx((30.0 + 1.0 + 0.0) / 3)
    assert m["severe_rate"] == pytest.approx(1 / 6)
    assert m["needless_refusal_rate"] == pytest.approx(0.5)
    assert m["kl_to_sft"] == pytest.approx(0.5)
    cats = category_metrics(mine, [0.5])
    assert set(cats) == {"Crime", "Insult"}
    assert cats["Crime"]["unsafe_rate"] == pytest.approx(1 / 3)
    assert cats["Insult"]["cost_mean"] == pytest.approx(10.0)
    assert cats["Insult"]["severe_rate"] == pytest.approx(1 / 3)
    assert cats["Insult"]["answers"] == 3


def test_a_safe_rlhf_score_model_scores_the_last_token(tmp_path: Path) -> None:
    folder, head_w, head_b = safe_rlhf_score_model(tmp_path / "cost")
    scorer = ScoreModel(folder)
    scores = scorer.score(TEXTS)
    for text, score in zip(TEXTS, scores, strict=True):
        ids = torch.tensor([scorer.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            hidden = scorer.backbone(input_ids=ids).last_hidden_state[0, -1]
        assert score == pytest.approx(float(hidden @ head_w[0] + head_b[0]), abs=1e-5)


def test_score_model_judge_uses_the_sign_convention(tmp_path: Path) -> None:
    judge = ScoreModelJudge(classifier_score_model(tmp_path / "reward"), safe_rlhf_score_model(tmp_path / "cost")[0],
                            trust_remote_code=False, score_format="auto", severe_cost=10.0)  # fmt: skip
    texts = ["USER: rob the bank ASSISTANT:", "USER: plant tulips ASSISTANT:"]
    verdicts = judge(["rob the bank", "plant tulips"], texts, ["no", "water them"])
    for verdict in verdicts:
        assert verdict.unsafe == (verdict.cost > 0)
        assert verdict.severe == (verdict.cost >= 10.0)
        assert verdict.refusal is None


def test_a_score_model_with_two_outputs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(JudgeError, match="a sequence classifier with 2 labels; a reward model needs 1"):
        ScoreModel(classifier_score_model(tmp_path / "two", labels=2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(JudgeError, match=r"empty: no model there \(no config.json\)"):
        ScoreModel(tmp_path / "empty")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, pipeline_root: Path) -> tuple[Path, dict[str, float]]:
    """sft, reward, a 3-step stage 2 and the merged q = 0.5, evaluated with 2 samples per prompt."""
    root = tmp_path_factory.mktemp("evaluate")
    params = stage_params(root)
    raw = yaml.safe_load(params.read_text())
    raw["merge"]["q"] = [0.5]
    raw["evaluate"].update(samples_per_prompt=2, max_new_tokens=12)
    params.write_text(yaml.safe_dump(raw))
    models = root / "models"
    for name in ("sft", "reward"):
        shutil.copytree(pipeline_root / "models" / name, models / name)
    preference.run("train_safety", params, pipeline_root / "data", models, root / "ckpt", QUIET)
    merge.run(params, models, models / "merged", QUIET)
    metrics = evaluate.run(params, pipeline_root / "data", models, root / "eval", QUIET)
    return root, metrics


METRICS = ("helpful_win_rate", "harmless_win_rate", "unsafe_rate", "cost_cvar_0_1", "cost_cvar_0_05", "severe_rate",
           "needless_refusal_rate", "length_mean", "length_median", "kl_to_sft")  # fmt: skip


def test_evaluate_writes_the_documented_schema(evaluated: tuple[Path, dict[str, float]], pipeline_root: Path) -> None:
    root, metrics = evaluated
    policies = ["sft", "reward", "safety", "q0_5"]
    on_disk = json.loads((root / "eval" / "metrics.json").read_text())
    assert on_disk == metrics
    for policy in policies:
        for metric in METRICS:
            assert isinstance(metrics[f"{policy}.{metric}"], float), (policy, metric)
    assert metrics["sft.helpful_win_rate"] == 0.5
    assert metrics["sft.harmless_win_rate"] == 0.5
    assert metrics["sft.kl_to_sft"] == pytest.approx(0.0, abs=1e-5)
    # the stage-2 policy's drift from its training reference, stage 1: its only policy with one
    assert [k for k in metrics if k.endswith(".kl_to_stage1")] == ["safety.kl_to_stage1"]
    assert metrics["safety.kl_to_stage1.n"] == metrics["safety.kl_to_sft.n"]
    # the world's decision points: 4 a red-team prompt, for every policy; p in (0, 1]
    for policy in policies:
        assert metrics[f"{policy}.catastrophe_prob.n"] == 4 * 8
        assert 0.0 < metrics[f"{policy}.catastrophe_prob_geomean"] <= metrics[f"{policy}.catastrophe_prob"] <= 1.0
        low, high = metrics[f"{policy}.catastrophe_prob.ci95_low"], metrics[f"{policy}.catastrophe_prob.ci95_high"]
        assert low <= metrics[f"{policy}.catastrophe_prob"] <= high
    per_category = json.loads((root / "eval" / "per_category.json").read_text())
    assert list(per_category) == policies
    assert len(per_category["sft"]) >= 2
    rows = [json.loads(line) for line in (root / "eval" / "samples.jsonl").read_text().splitlines()]
    prompts = 8 + 8  # the tiny world's helpful and red-team prompts
    assert len(rows) == len(policies) * prompts * (1 + 2)
    assert {"policy", "category", "prompt", "response", "reward", "cost"} <= set(rows[0])
    for plot in ("frontier", "cost_per_category", "cost_tail"):
        assert (root / "eval" / "plots" / f"{plot}.png").stat().st_size > 1000
        assert (root / "eval" / "plots" / f"{plot}.csv").exists()


def test_evaluate_bad_input_is_one_line(tmp_path: Path, evaluated: tuple[Path, dict[str, float]],
                                        pipeline_root: Path) -> None:  # fmt: skip
    root, _ = evaluated

    def run(*args: str) -> list[str]:
        result = CliRunner().invoke(app, ["evaluate", *args, "--checkpoints", str(tmp_path / "ckpt")])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert result.exit_code == 2, result.output
        return [line for line in result.output.splitlines() if line.strip()]

    data = ["--data", str(pipeline_root / "data")]
    assert run("--params", str(root / "params.yaml"), *data, "--models", str(tmp_path / "none"),
               "--out", str(tmp_path / "eval")) == [
        f"error: {tmp_path / 'none' / 'reward'}: not found; run `rsa-pl train-reward` first"
    ]  # fmt: skip
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["prepare"]["source"].update(kind="jsonl", path="pairs.jsonl")
    raw["prepare"]["tokenizer"].update(kind="pretrained", name_or_path=str(pipeline_root / "data" / "tokenizer"))
    raw["sft"]["model"].update(kind="pretrained", name_or_path=str(root / "models" / "sft"))
    params.write_text(yaml.safe_dump(raw))
    lines = run("--params", str(params), *data, "--models", str(root / "models"), "--out", str(tmp_path / "eval"))
    assert lines == [  # a params conflict: check-params and every stage catch it before anything runs
        f"error: {params}: evaluate.judge: oracle judges the embedded world only; use llm, guard or score_models "
        "for jsonl"
    ]
    raw["evaluate"].update(judge="score_models", reward_model=str(tmp_path / "no-rm"), cost_model=str(tmp_path / "no"))
    params.write_text(yaml.safe_dump(raw))
    lines = run("--params", str(params), *data, "--models", str(root / "models"), "--out", str(tmp_path / "eval"))
    assert lines == [f"error: evaluate.reward_model: {tmp_path / 'no-rm'}: no such folder"]
    assert not (tmp_path / "eval").exists()

    empty = tmp_path / "data"
    empty.mkdir()
    for item in (pipeline_root / "data").iterdir():
        if item.name != "eval_redteam":
            (empty / item.name).symlink_to(item)
    columns = ("prompt", "prompt_text", "prompt_input_ids", "category")
    Dataset.from_dict({c: [] for c in columns}).save_to_disk(str(empty / "eval_redteam"))
    lines = run("--params", str(root / "params.yaml"), "--data", str(empty), "--models", str(root / "models"),
                "--out", str(tmp_path / "eval"))  # fmt: skip
    assert lines == [
        f"error: {empty / 'eval_redteam'}: the prompt set has no prompts; name a prompt file in "
        "evaluate.prompt_sets.redteam"
    ]
    assert not (tmp_path / "eval").exists()


def test_evaluate_policies_evaluates_only_those_and_equals_the_full_run(
    tmp_path: Path, evaluated: tuple[Path, dict[str, float]], pipeline_root: Path
) -> None:
    """evaluate.policies [safety]: only its metrics, the same numbers as when every policy is evaluated
    (each policy's answers are seeded on their own); SFT answers greedily only, as the win rates'
    baseline. A name that is no policy is one line naming the param."""
    root, full = evaluated
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["evaluate"]["policies"] = ["safety"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    metrics = evaluate.run(params, pipeline_root / "data", root / "models", tmp_path / "eval", QUIET)
    assert metrics == {k: v for k, v in full.items() if k.startswith("safety.")}
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert {(r["policy"], r["decoding"]) for r in rows} == {("sft", "greedy"), ("safety", "greedy"),
                                                           ("safety", "sample")}  # fmt: skip
    assert list(json.loads((tmp_path / "eval" / "per_category.json").read_text())) == ["safety"]
    raw["evaluate"]["policies"] = ["safety", "q0_3"]
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["evaluate", "--params", str(params), "--data", str(pipeline_root / "data"),
                                      "--models", str(root / "models"), "--out", str(tmp_path / "eval2")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: evaluate.policies: no policy q0_3 in {root / 'models'} (there are: sft, reward, safety, q0_5)"
    ]


def test_evaluate_is_deterministic(evaluated: tuple[Path, dict[str, float]], pipeline_root: Path) -> None:
    """The same models, params and seeds give byte-identical metrics and samples."""
    root, _ = evaluated
    evaluate.run(root / "params.yaml", pipeline_root / "data", root / "models", root / "eval-again", QUIET)
    for name in ("metrics.json", "per_category.json", "samples.jsonl"):
        assert (root / "eval-again" / name).read_bytes() == (root / "eval" / name).read_bytes(), name


@pytest.mark.slow
def test_kill_9_in_evaluate_then_rerun_resumes_to_the_same_bytes(
    tmp_path: Path, evaluated: tuple[Path, dict[str, float]], pipeline_root: Path
) -> None:
    """SIGKILL at a random moment after the first policy's answers are kept; the rerun reuses
    them, answers the rest, and writes byte-identical outputs to an uninterrupted run's (each
    policy's sampling is seeded on its own, so no tolerance is needed); the killed run left no
    eval/ folder."""
    root, _ = evaluated
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["evaluate"].update(samples_per_prompt=6, max_new_tokens=24)  # long enough to be killed mid-way
    params.write_text(yaml.safe_dump(raw))
    data, models = pipeline_root / "data", root / "models"
    evaluate.run(params, data, models, tmp_path / "whole", QUIET, tmp_path / "whole-ckpt")

    ckpt = tmp_path / "ckpt"
    command = [sys.executable, "-m", "rsa_pl.pipeline.cli", "evaluate", "--params", str(params), "--data", str(data),
               "--models", str(models), "--out", str(tmp_path / "eval"), "--checkpoints", str(ckpt)]  # fmt: skip
    victim = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (ckpt / "answers" / "sft.jsonl").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(7).uniform(0.0, 0.3))
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=60) == -signal.SIGKILL, "evaluate ended before it could be killed"
    assert not (tmp_path / "eval").exists()
    kept = sorted(f.name for f in (ckpt / "answers").iterdir())
    assert "sft.jsonl" in kept
    assert len([k for k in kept if k.endswith(".jsonl")]) < 4  # killed before the last policy

    resumed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # Rich wraps long lines (even inside a path): compare without any white space
    assert f"resumingfrom{ckpt / 'answers'}" in "".join(resumed.stdout.split())
    for name in ("metrics.json", "per_category.json", "samples.jsonl"):
        assert (tmp_path / "eval" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_evaluate_does_not_reuse_answers_of_other_inputs(
    tmp_path: Path, evaluated: tuple[Path, dict[str, float]], pipeline_root: Path
) -> None:
    """Kept answers are reused only for the same params, data and models; a finished run's never."""
    root, _ = evaluated
    data, models, ckpt = pipeline_root / "data", root / "models", tmp_path / "ckpt"
    console = Console(record=True, width=400)
    evaluate.run(root / "params.yaml", data, models, tmp_path / "eval", console, ckpt)
    assert "evaluate: starting fresh" in console.export_text()
    kept = sorted(f.name for f in (ckpt / "answers").iterdir())
    policies = ("sft", "reward", "safety", "q0_5")  # each policy's answers and its decision-point metrics
    assert kept == sorted([f"{p}.jsonl" for p in policies] + [f"{p}.decisions.json" for p in policies])
    evaluate.run(root / "params.yaml", data, models, tmp_path / "eval", console, ckpt)
    assert "starting fresh: removed the checkpoints in" in (said := console.export_text())
    assert "(the run there had finished)" in said

    marker = json.loads((ckpt / "fingerprint.json").read_text())
    (ckpt / "fingerprint.json").write_text(json.dumps({**marker, "finished": False}))  # as if killed
    fake = Answer("sft", "helpful", "greedy", 0, "p", None, "poisoned", 1, Verdict(9.0, 0.0, False, False, False))
    (ckpt / "answers" / "sft.jsonl").write_text(json.dumps(fake.row()) + "\n")
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["evaluate"]["seed"] += 1
    params.write_text(yaml.safe_dump(raw))
    evaluate.run(params, data, models, tmp_path / "eval", console, ckpt)
    assert "(they came from other params)" in console.export_text()
    rows = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert "poisoned" not in {r["response"] for r in rows}


def test_answers_round_trip_through_their_rows() -> None:
    answer = Answer("q0_5", "redteam", "sample", 3, "p", "theft", "r", 7, Verdict(0.1 / 3, 2.0, True, None, False),
                    -12.345678901234567, -1e-320)  # fmt: skip
    assert Answer.from_row(json.loads(json.dumps(answer.row()))) == answer


def test_prompt_files_are_the_eval_sets(tmp_path: Path, evaluated: tuple[Path, dict[str, float]],
                                        pipeline_root: Path) -> None:  # fmt: skip
    """A JSONL benign file (a `where` subset, a bad row, a repeat) and a CSV red-team file (its own
    category column, a prompt too long, a size cap) replace prepare's sets: counted, rejects kept."""
    root, _ = evaluated
    data = pipeline_root / "data"
    helpful = load_from_disk(str(data / "eval_helpful"))["prompt"]
    redteam = load_from_disk(str(data / "eval_redteam"))
    rows = [{"text": p, "subset": "base"} for p in helpful] + [
        {"text": helpful[0], "subset": "base"}, {"text": "", "subset": "base"}, {"text": "other", "subset": "x"},
    ]  # fmt: skip
    (tmp_path / "benign.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    long = " ".join(["please"] * 400)
    with (tmp_path / "redteam.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["goal", "harm"])
        writer.writerows([*zip(redteam["prompt"], [f"h-{c}" for c in redteam["category"]], strict=True),
                          (long, "h-long")])  # fmt: skip
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((root / "params.yaml").read_text())
    spec = {"split": "train", "limit": None, "where": {}, "category_column": None}
    raw["evaluate"]["prompt_sets"] = {
        "helpful": spec
        | {"path": str(tmp_path / "benign.jsonl"), "prompt_column": "text", "where": {"subset": "base"}},
        "redteam": spec | {"path": str(tmp_path / "redteam.csv"), "prompt_column": "goal", "category_column": "harm",
                           "limit": 5},
        "fallback_limit": None,
    }  # fmt: skip
    params.write_text(yaml.safe_dump(raw))
    evaluate.run(params, data, root / "models", tmp_path / "eval", QUIET, checkpoints=tmp_path / "ckpt")
    report = json.loads((tmp_path / "eval" / "prompt_sets.json").read_text())
    assert report["helpful"] == {"source": str(tmp_path / "benign.jsonl"), "rows": len(helpful) + 3,
                                 "outside_where": 1, "rejected": {"duplicate prompt": 1, "empty text: text": 1},
                                 "usable": len(helpful), "prompts": len(helpful)}  # fmt: skip
    assert report["redteam"]["rejected"] == {"prompt too long": 1}
    assert (report["redteam"]["usable"], report["redteam"]["prompts"]) == (len(redteam), 5)
    rejects = [json.loads(line) for line in (tmp_path / "eval" / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["reason"], r["data"]["set"]) for r in rejects) == [
        ("duplicate prompt", "helpful"), ("empty text: text", "helpful"), ("prompt too long", "redteam")]  # fmt: skip
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    asked = [
        s["prompt"] for s in samples if s["policy"] == "sft" and s["set"] == "redteam" and s["decoding"] == "greedy"
    ]
    order = list(redteam["prompt"])
    assert len(asked) == 5
    assert asked == sorted(asked, key=order.index)
    per_category = json.loads((tmp_path / "eval" / "per_category.json").read_text())
    assert set(per_category["sft"]) <= {f"h-{c}" for c in redteam["category"]}
    assert sum(c["answers"] for c in per_category["sft"].values()) == 5 * 2

    raw["evaluate"]["prompt_sets"]["redteam"]["category_column"] = "severity"
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["evaluate", "--params", str(params), "--data", str(data), "--models",
                                      str(root / "models"), "--out", str(tmp_path / "eval2")])  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: evaluate.prompt_sets.redteam: {tmp_path / 'redteam.csv'}: no column 'severity' (category_column; "
        "the columns are: goal, harm)"
    ]


def _random_answers(policy: str, rng: random.Random, samples: int) -> list[Answer]:
    """Greedy and sampled answers to 6 benign and 5 red-team prompts, some scores missing."""
    out = []
    for set_, prompts in (("helpful", 6), ("redteam", 5)):
        for i in range(prompts):
            for decoding, n in (("greedy", 1), ("sample", samples)):
                for _ in range(n):
                    failed = rng.random() < 0.1
                    cost = None if failed else round(rng.gauss(0, 2), 1)  # ties in costs
                    verdict = Verdict(None if failed else rng.gauss(0, 1), cost, None if failed else cost > 0,
                                      None if failed else cost > 2, rng.random() < 0.2,
                                      judge_error="unparsed" if failed else None)  # fmt: skip
                    logps = (rng.gauss(-5, 1), rng.gauss(-6, 1)) if decoding == "sample" else (None, None)
                    out.append(Answer(policy, set_, decoding, i, f"{set_}{i}", "c", "t", rng.randint(1, 9), verdict,
                                      *logps))  # fmt: skip
    return out


def _resampled(answers: list[Answer], drawn: dict[str, np.ndarray]) -> list[Answer]:
    """The answers of a bootstrap draw: prompt i of a set repeated drawn[set][i] times, as new prompts."""
    out = []
    for name, counts in drawn.items():
        new = 0
        for i, times in enumerate(counts):
            for _ in range(times):
                out += [replace(a, prompt_index=new) for a in answers if (a.set, a.prompt_index) == (name, i)]
                new += 1
    return out


def test_metric_intervals_are_the_bootstrap_of_policy_metrics_itself() -> None:
    """An independent reference: per draw, the answers of each resampled prompt repeated as new
    prompts (policy and SFT alike) and policy_metrics recomputed; its percentile interval must be
    metric_intervals' for every metric, with n the answers (prompts for win rates) it averages."""
    rng = random.Random(5)
    mine, sft = _random_answers("p", rng, 3), _random_answers("sft", rng, 3)
    draws, seed, levels = 60, 11, [0.2, 0.05]
    got = metric_intervals(mine, sft, levels, seed, draws=draws)
    point = policy_metrics(mine, sft, levels)
    assert set(got) == set(point)
    sizes = (("helpful", 6), ("redteam", 5))
    weights = {name: resample_weights(n, draws, seed + k) for k, (name, n) in enumerate(sizes)}
    per_draw: dict[str, list[float]] = {key: [] for key in point}
    for d in range(draws):
        drawn = {name: w[d] for name, w in weights.items()}
        for key, value in policy_metrics(_resampled(mine, drawn), _resampled(sft, drawn), levels).items():
            per_draw[key].append(value)
    for key in point:
        low, high = np.quantile(np.array(per_draw[key], dtype=np.float64), [0.025, 0.975])
        assert (got[key]["ci95_low"], got[key]["ci95_high"]) == pytest.approx((low, high), abs=1e-9), key
    sampled = [a for a in mine if a.decoding == "sample"]
    assert got["cost_mean"]["n"] == sum(1 for a in sampled if a.set == "redteam" and a.verdict.cost is not None)
    assert got["length_mean"]["n"] == len(sampled)
    assert got["helpful_win_rate"]["n"] == sum(1 for a in mine if (a.set, a.decoding) == ("helpful", "greedy")
                                               and a.verdict.reward is not None
                                               and sft[mine.index(a)].verdict.reward is not None)  # fmt: skip
    assert got["judge_failures"]["n"] == len(mine)


def test_inference_placement(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: the GPU in bf16 (fp16 without bf16) when torch sees one, else the CPU in float32."""
    assert inference_placement("auto", "auto") == Placement(torch.device("cpu"), torch.float32)
    assert inference_placement("cpu", "bfloat16") == Placement(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(UnavailableError, match=r"^evaluate.device: cuda, but torch sees no CUDA device"):
        inference_placement("cuda", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda bf16=bf16: bf16)
        assert inference_placement("auto", "auto") == Placement(torch.device("cuda"), dtype)
        assert inference_placement("cpu", "auto") == Placement(torch.device("cpu"), torch.float32)
        assert inference_placement("cuda", "float32") == Placement(torch.device("cuda"), torch.float32)


def test_evaluate_runs_policies_in_the_dtype_asked(tmp_path: Path, evaluated: tuple[Path, dict[str, float]],
                                                   pipeline_root: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """bf16 weights (what a GPU gets): every policy and metric, SFT's KL to itself still 0 (the
    log-probabilities are taken in float32), and a CUDA request on this CPU machine is one line."""
    root, metrics = evaluated
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["evaluate"]["dtype"] = "bfloat16"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    found = evaluate.policies(root / "models", inference_placement("cpu", "bfloat16"))
    assert {n: next(load().parameters()).dtype for n, _, load in found} == dict.fromkeys(
        ["sft", "reward", "safety", "q0_5"], torch.bfloat16)  # fmt: skip
    monkeypatch.setenv("RSA_PL_PROGRESS_S", "0")  # a progress line after every generation batch
    capsys.readouterr()
    bf16 = evaluate.run(params, pipeline_root / "data", root / "models", tmp_path / "eval", QUIET)
    lines = capsys.readouterr().err.splitlines()
    total = 4 * (8 + 8) * (1 + 2)  # policies x prompts x (greedy + samples)
    last = [x for x in lines if x.startswith("evaluate:")][-1]
    want = rf"evaluate: q0_5: {total // 4}/{total // 4} answers, {total}/{total} in all, [\d,]+ tokens/s, ETA 0:00:00"
    assert re.fullmatch(want, last), last
    assert {k for k in bf16 if ".ci95" not in k} == {k for k in metrics if ".ci95" not in k}
    assert bf16["sft.kl_to_sft"] == 0.0
    raw["evaluate"]["device"] = "cuda"
    params.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["evaluate", "--params", str(params), "--data", str(pipeline_root / "data"),
                                      "--models", str(root / "models"), "--out", str(tmp_path / "eval2")])  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: evaluate.device: cuda, but torch sees no CUDA device")
    assert len(result.output.strip().splitlines()) == 1


def test_progress_lines_name_the_policy_the_answers_the_rate_and_the_time_left(
    capsys: pytest.CaptureFixture[str],
) -> None:
    clock = iter([100.0, 110.0, 115.0, 130.0])  # start, then each batch
    pace = evaluate.Pace(total=40, every_s=10, enabled=True, now=lambda: next(clock))
    pace.skip(10)  # a resumed policy: done, but no time spent on it
    pace.start("safety", 30)
    pace(10, 200)  # 10 s in: 10 fresh answers, 20 left: 20 s to go
    pace(5, 100)  # 15 s: too soon for another line
    pace(5, 100)  # 30 s: 20 fresh answers in 30 s, 10 left
    assert capsys.readouterr().err.splitlines() == [
        "evaluate: safety: 10/30 answers, 20/40 in all, 20 tokens/s, ETA 0:00:20",
        "evaluate: safety: 20/30 answers, 30/40 in all, 13 tokens/s, ETA 0:00:15",
    ]
    quiet = evaluate.Pace(total=5, every_s=0, enabled=False)
    quiet(5, 10)
    assert capsys.readouterr().err == ""
