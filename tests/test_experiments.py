"""The embedded-world experiment (experiments/): its grid is valid params of the one DAG, and the
report is computed from runs.json as it says (means, spreads, paired differences, frontier)."""

from __future__ import annotations

import copy
import math
import random
import statistics
from pathlib import Path

import pytest
import yaml

from experiments import embedded, report
from experiments.grid import METHODS, Q_PATH, SEEDS, SETTINGS, queue_order
from rsa_pl.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def _apply(raw: dict, overrides: dict[str, str]) -> dict:
    """What `dvc exp run -S key=value` does to params.yaml (values parsed as YAML scalars/lists)."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        assert last in node, f"{key}: not a key of params.yaml (-S would add it silently)"
        node[last] = yaml.safe_load(value)
    return raw


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_valid_params_for_every_seed(setting, tmp_path: Path) -> None:
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    seen_seeds = set()
    for seed in SEEDS:
        path = tmp_path / f"s{seed}.yaml"
        path.write_text(yaml.safe_dump(_apply(base, setting.overrides(seed))))
        params = load_params(path)
        assert params.train_reward.train.seed == params.train_safety.train.seed == seed
        seen_seeds.add(params.evaluate.seed)
        assert {params.train_reward.pairs, params.train_safety.pairs} == {"helpful", "safety"}
        assert list(params.merge.q) == list(setting.q)
    assert len(seen_seeds) == len(SEEDS)  # sampling differs between seeds too


def test_the_grid_has_the_issues_methods() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    by_name = {s.name: s for s in SETTINGS}
    assert by_name["sacpo"].stage1.loss == by_name["sacpo"].stage2.loss == "dpo"
    assert by_name["tdpo"].stage1.measure == "kl"
    assert {(s.stage2.measure, s.stage2.mu) for s in SETTINGS if s.stage2.loss == "rsa" and s.stage2.alpha == 0.5} >= {
        ("cvar", 0.9), ("cvar", 0.95), ("cvar", 0.99), ("erm", 1.0), ("erm", 2.0), ("erm", 5.0)
    }  # fmt: skip
    assert by_name["sacpo"].q == by_name["rsa-cvar-0.95"].q == Q_PATH
    reverse = by_name["rsa-cvar-0.95-safety-first"]
    assert (reverse.stage1.pairs, reverse.stage2.pairs) == ("safety", "helpful")
    assert len(SEEDS) >= 3


def test_every_method_row_names_a_policy_its_setting_evaluates() -> None:
    by_name = {s.name: s for s in SETTINGS}
    for method in METHODS:
        setting = by_name[method.setting]
        policies = {"sft", "reward", "safety"} | {f"q{q:g}" for q in setting.q}
        assert method.policy in policies, method
    assert len({m.label for m in METHODS}) == len(METHODS)


def _fake_runs(tail_shift: float = 0.0, missing: tuple[str, ...] = (), helpful_shift: float = 0.0) -> dict:
    """runs.json as collect writes it, with metrics that are a known function of (setting, policy, seed)."""
    rng = random.Random(0)
    experiments = {}
    for setting in SETTINGS:
        for seed in SEEDS:
            name = setting.experiment(seed)
            if name in missing:
                continue
            policies = ["sft", "reward", "safety", *(f"q{q:g}" for q in setting.q)]
            rsa = setting.stage2.loss == "rsa"
            evaluation, per_category, tails = {}, {}, {}
            for policy in policies:
                noise = rng.uniform(-0.01, 0.01)
                values = {
                    "helpful_win_rate": 0.6 + noise + (helpful_shift if rsa and policy == "safety" else 0.0),
                    "harmless_win_rate": 0.5 + noise,
                    "reward_mean": 1.5 + noise,
                    "cost_mean": 2.0 + noise,
                    "unsafe_rate": 0.4 + noise,
                    "cost_cvar_0.1": 10.0 + noise,
                    "cost_cvar_0.05": 20.0 + noise - (tail_shift if rsa and policy == "safety" else 0.0),
                    "severe_rate": 0.05,
                    "needless_refusal_rate": 0.01,
                    "length_mean": 25.0,
                    "length_median": 25.0,
                    "kl_to_sft": 1.0,
                }
                evaluation |= {f"{policy}.{k}": v for k, v in values.items()}
                per_category[policy] = {
                    c: {"answers": 96.0, "cost_mean": 2.0 + seed, "cost_cvar_0.05": 20.0, "severe_rate": 0.05}
                    for c in ("Crime", "Insult")
                }
                tails[policy] = [[0.0, 1.0], [1.0, 0.5], [30.0 + seed, 0.05]]
            experiments[name] = {
                "setting": setting.name,
                "seed": seed,
                "rev": "0" * 40,
                "timestamp": "2026-11-28T00:00:00",
                "params": _flat_params(),
                "eval": evaluation,
                "train": {
                    "metrics/train_reward.json": {"time/train_s": 60.0 + seed},
                    "metrics/train_safety.json": {"time/train_s": 60.0},
                },
                "per_category": per_category,
                "cost_tail": tails,
            }
    return {"experiments": experiments}


def _flat_params() -> dict:
    from experiments.report import _flatten

    return _flatten(yaml.safe_load((ROOT / "params.yaml").read_text()))


def test_paired_interval_matches_a_float64_reference() -> None:
    diffs = [-1.5, -0.5, -1.0]
    mean, lo, hi = report.paired_ci(diffs)
    sd = statistics.stdev(diffs)
    assert mean == pytest.approx(-1.0)
    assert hi == pytest.approx(-1.0 + 4.303 * sd / math.sqrt(3))
    assert lo == pytest.approx(-1.0 - 4.303 * sd / math.sqrt(3))
    assert math.isnan(report.paired_ci([1.0])[1])  # one pair: no interval


def test_the_report_says_rsa_beats_sacpo_only_when_every_interval_says_so(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    clear = report.write(_fake_runs(tail_shift=5.0), tmp_path / "reports").read_text()
    line = next(x for x in clear.splitlines() if x.startswith("- RSA cvar mu=0.95:"))
    assert "beats SACPO on the tail" in line
    assert "CVaR5% cost better" in line
    assert "helpful win unclear" in line
    same = report.write(_fake_runs(tail_shift=0.0), tmp_path / "reports").read_text()
    line = next(x for x in same.splitlines() if x.startswith("- RSA cvar mu=0.95:"))
    assert "no tail difference from SACPO that 3 seeds can resolve" in line
    worse = report.write(_fake_runs(tail_shift=-5.0), tmp_path / "reports").read_text()
    assert "worse tail than SACPO" in next(x for x in worse.splitlines() if x.startswith("- RSA cvar mu=0.95:"))
    # a heavier tail bought with more helpfulness is not matched either way
    traded = report.write(_fake_runs(tail_shift=-5.0, helpful_shift=0.2), tmp_path / "reports").read_text()
    line = next(x for x in traded.splitlines() if x.startswith("- RSA cvar mu=0.95:"))
    assert "heavier tail than SACPO, but **more helpful** (not a matched comparison)" in line


def test_the_report_has_every_section_figure_and_method(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    text = report.write(_fake_runs(missing=("emb-rsa-erm-5-s2",)), tmp_path / "reports").read_text()
    for heading in ("## Setup", "## Verdict", "## Every method", "## Paired differences", "## The frontier",
                    "## The cost tail", "## Sensitivity", "## The cost of the risk term"):  # fmt: skip
        assert heading in text
    for method in METHODS:
        assert f"| {method.label} |" in text
    assert (tmp_path / "reports" / "embedded" / "frontier.png").stat().st_size > 10_000
    assert (tmp_path / "reports" / "embedded" / "cost_tail.png").stat().st_size > 10_000
    # a per-category mean over seeds 0, 1, 2 of 2 + seed: 3.00 ± 1.00
    assert "| Crime | 3.00 ± 1.00 |" in text
    # the missing experiment: RSA erm 5 has 2 seeds, every other method 3
    assert "| RSA erm mu=5 | 2 |" in text
    assert "| TDPO then TDPO | 3 |" in text


def test_a_discussion_written_for_other_runs_is_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _fake_runs()
    discussion = tmp_path / "discussion.md"
    monkeypatch.setattr(report, "DISCUSSION", discussion)
    (tmp_path / "reports").mkdir()
    discussion.write_text(f"## Discussion\n\nruns: {report.runs_digest(runs)}\n")
    assert "written for other runs" not in report.write(runs, tmp_path / "reports").read_text()
    discussion.write_text("## Discussion\n\nruns: 0123456789abcdef\n")
    assert "written for other runs" in report.write(runs, tmp_path / "reports").read_text()


def test_the_queue_runs_the_headline_comparison_for_every_seed_first() -> None:
    order = queue_order()
    assert len(order) == len(set(order)) == len(SETTINGS) * len(SEEDS)
    headline = [i for i, (setting, _) in enumerate(order) if setting.priority == 0]
    assert headline == list(range(len(headline)))  # a queue cut short keeps every headline seed
    assert {seed for setting, seed in order[: len(headline)]} == set(SEEDS)
    sweeps = [seed for setting, seed in order if setting.priority == 1]
    assert sweeps == sorted(sweeps)  # then seed by seed


QUEUE_STATUS = """Task     Name                        Created    Status
2d40c05  emb-sacpo-s1                02:21 PM   Running
bc89bec  emb-sacpo-lr5e-4-b0.1-s0    02:23 PM   Queued
3458de2  emb-sacpo-lr5e-4-s2         02:20 PM   Success
c1fabdf  emb-rsa-cvar-0.95-a0.25-s1  02:20 PM   Failed

Worker status: 1 active, 0 idle
"""


def test_dvc_queue_status_is_read_with_its_workers() -> None:
    status, workers = embedded.parse_queue_status(QUEUE_STATUS)
    assert status == {
        "emb-sacpo-s1": "Running",
        "emb-sacpo-lr5e-4-b0.1-s0": "Queued",
        "emb-sacpo-lr5e-4-s2": "Success",
        "emb-rsa-cvar-0.95-a0.25-s1": "Failed",
    }
    assert workers == 1
    assert embedded.parse_queue_status(QUEUE_STATUS.replace("1 active, 0 idle", "1 active, 1 idle"))[1] == 2


def test_the_wait_starts_the_workers_again_only_when_the_queue_stalls(monkeypatch: pytest.MonkeyPatch) -> None:
    # one worker of two is gone but a task runs: no start (a busy worker may miss the status query
    # and a second start would duplicate it); then every worker is gone with a task queued: started
    done = "Task  Name  Created  Status\n3458de2  emb-a-s0  02:20 PM  Success\n\nWorker status: 0 active, 0 idle\n"
    stalled = QUEUE_STATUS.replace("Running", "Success").replace("1 active", "0 active")
    replies = iter([QUEUE_STATUS, stalled, QUEUE_STATUS, done])
    starts: list[int] = []
    monkeypatch.setattr(embedded, "_dvc", lambda *args, **kw: next(replies))
    monkeypatch.setattr(embedded, "start_workers", starts.append)
    monkeypatch.setattr(embedded, "WORKER_GRACE_S", -1.0)
    monkeypatch.setattr(embedded.time, "sleep", lambda s: None)
    embedded._wait(poll=0.0, jobs=2)
    assert starts == [2]
    # a stall shorter than the grace period starts nothing (a worker may be between two tasks)
    replies = iter([stalled, QUEUE_STATUS, done])
    monkeypatch.setattr(embedded, "WORKER_GRACE_S", 3600.0)
    embedded._wait(poll=0.0, jobs=2)
    assert starts == [2]
