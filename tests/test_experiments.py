"""The embedded-world experiment (experiments/): its grid is valid params of the one DAG, and the
report is computed from runs.json as it says (means, spreads, paired differences, frontier): collect
reads the runs (old and new policy and tail-metric names, both training-metrics layouts), stats gives
the numbers (scipy's t quantiles), render writes them, every number of its prose read from the runs."""

from __future__ import annotations

import copy
import json
import math
import random
import statistics
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from experiments import collect, embedded, render, stats
from experiments.grid import METHODS, Q_PATH, SEEDS, SETTINGS, queue_order
from rsa_pl.params_file import load_params

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
        policies = {"sft", "reward", "safety"} | {collect.merged_policy(q) for q in setting.q}
        assert method.policy in policies, method
        assert "." not in method.policy, method  # a key's part: <policy>.<metric> splits on dots
    assert len({m.label for m in METHODS}) == len(METHODS)


def _fake_runs(
    tail_shift: float = 0.0,
    missing: tuple[str, ...] = (),
    helpful_shift: float = 0.0,
    base: dict | None = None,
    params: Callable[[dict], dict] = lambda p: p,
    dvclive: bool = False,
    old: bool = False,
) -> dict:
    """runs.json as collect writes it (merged policies q0_5, tail metrics cost_cvar_0_05), or if old
    as it wrote them before the renames (q0.5, cost_cvar_0.05), with metrics that are a known function
    of (setting, policy, seed), the same in either spelling; each run's params are params.yaml (or
    base) with its setting's overrides, then passed through params; the training metrics in dvclive's
    layout if dvclive."""
    rng = random.Random(0)
    cvar_10, cvar_5 = ("cost_cvar_0.1", "cost_cvar_0.05") if old else ("cost_cvar_0_1", "cost_cvar_0_05")
    base = base or yaml.safe_load((ROOT / "params.yaml").read_text())
    experiments = {}
    for setting in SETTINGS:
        for seed in SEEDS:
            name = setting.experiment(seed)
            if name in missing:
                continue
            merged = [f"q{q:g}" if old else collect.merged_policy(q) for q in setting.q]
            policies = ["sft", "reward", "safety", *merged]
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
                    cvar_10: 10.0 + noise,
                    cvar_5: 20.0 + noise - (tail_shift if rsa and policy == "safety" else 0.0),
                    "severe_rate": 0.05,
                    "needless_refusal_rate": 0.01,
                    "length_mean": 25.0,
                    "length_median": 25.0,
                    "kl_to_sft": 1.0,
                }
                evaluation |= {f"{policy}.{k}": v for k, v in values.items()}
                per_category[policy] = {
                    c: {"answers": 96.0, "cost_mean": 2.0 + seed, cvar_5: 20.0, "severe_rate": 0.05}
                    for c in ("Crime", "Insult")
                }
                tails[policy] = [[0.0, 1.0], [1.0, 0.5], [30.0 + seed, 0.05]]
            experiments[name] = {
                "setting": setting.name,
                "seed": seed,
                "rev": "0" * 40,
                "timestamp": "2026-11-28T00:00:00",
                "params": params(collect.flatten(_apply(base, setting.overrides(seed)))),
                "eval": evaluation,
                "train": _train_metrics({"train_reward": 60.0 + seed, "train_safety": 60.0}, dvclive),
                "per_category": per_category,
                "cost_tail": tails,
            }
    return {"experiments": experiments}


def _train_metrics(train_s: dict[str, float], dvclive: bool) -> dict:
    """The stages' training metrics as dvc exp show gives them: metrics/<stage>.json with flat keys,
    or dvclive's metrics/<stage>/metrics.json nested at each "/"."""
    if dvclive:
        return {
            f"metrics/{stage}/metrics.json": {"time": {"train_s": s}, "train": {"steps": 10}}
            for stage, s in train_s.items()
        }
    return {f"metrics/{stage}.json": {"time/train_s": s, "train/steps": 10} for stage, s in train_s.items()}


def _t975(df: int) -> float:
    """The Student-t 0.975 quantile in closed form (float64, independent of scipy): df 2 and 4."""
    p = 0.975
    if df == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    assert df == 4
    a = 4 * p * (1 - p)
    return 2 * math.sqrt(math.cos(math.acos(math.sqrt(a)) / 3) / math.sqrt(a) - 1)


def test_t_quantiles_are_the_textbooks() -> None:
    assert _t975(4) == pytest.approx(2.776445105, abs=1e-9)  # the tables' t_{0.975, 4} = 2.7764
    assert _t975(2) == pytest.approx(4.302652730, abs=1e-9)
    for df in (2, 4):
        assert stats.t_quantile(df) == pytest.approx(_t975(df), rel=1e-12)
    assert stats.t_quantile(10_000) == pytest.approx(1.959963985, abs=1e-3)  # towards the normal's
    assert stats.resolvable_effect(3) == pytest.approx(_t975(2) / math.sqrt(3), rel=1e-12)  # "2.48 sd"


@pytest.mark.parametrize("diffs", [[-1.5, -0.5, -1.0], [0.3, -0.1, 0.25, 0.4, 0.05]])
def test_paired_interval_matches_a_float64_reference(diffs: list[float]) -> None:
    mean, lo, hi = stats.paired_ci(diffs)
    n = len(diffs)
    sd = statistics.stdev(diffs)
    half = _t975(n - 1) * sd / math.sqrt(n)
    assert mean == pytest.approx(statistics.fmean(diffs), rel=1e-15)
    assert hi == pytest.approx(mean + half, rel=1e-12)
    assert lo == pytest.approx(mean - half, rel=1e-12)
    assert math.isnan(stats.paired_ci([1.0])[1])  # one pair: no interval


def test_a_difference_is_classified_by_its_interval() -> None:
    assert stats.classify([-1.1, -0.9, -1.0], "unsafe_rate") == "better"  # lower is better
    assert stats.classify([-1.1, -0.9, -1.0], "helpful_win_rate") == "worse"
    assert stats.classify([-1.5, -0.5, -1.0], "unsafe_rate") == "unclear"  # |mean| < 2.48 sd
    assert stats.classify([-1.0], "unsafe_rate") == "unclear"  # one pair: no interval
    assert stats.tail_verdict(["better", "unclear"], "unclear") == "beats"
    assert stats.tail_verdict(["better"], "worse") == "lower-but-less-helpful"
    assert stats.tail_verdict(["worse"], "better") == "heavier-but-more-helpful"
    assert stats.tail_verdict(["worse", "better"], "unclear") == "worse"
    assert stats.tail_verdict(["unclear"], "better") == "unresolved"


def test_old_policy_names_are_normalised_to_the_new() -> None:
    assert collect.policy_name("q0.5") == "q0_5"
    assert collect.policy_name("q0.25") == "q0_25"
    assert collect.policy_name("q0.5.helpful_win_rate") == "q0_5.helpful_win_rate"
    assert collect.policy_name("q0.5.cost_cvar_0.05") == "q0_5.cost_cvar_0.05"  # only the policy's dot
    for unchanged in ("q0_5", "q0_5.cost_cvar_0.05", "q1", "q0", "q1.cost_cvar_0.05", "sft", "safety.unsafe_rate"):
        assert collect.policy_name(unchanged) == unchanged
    assert [collect.merged_policy(q) for q in (0.0, 0.25, 0.5, 1.0)] == ["q0", "q0_25", "q0_5", "q1"]
    runs = _fake_runs(old=True)
    new = collect.normalise(runs)
    record = new["experiments"]["emb-sacpo-s0"]
    assert "q0_5.helpful_win_rate" in record["eval"]
    assert "q0.5.helpful_win_rate" not in record["eval"]
    assert {"q0_25", "q0_5", "q0_75"} <= record["per_category"].keys()
    assert "q0_5" in record["cost_tail"]
    assert collect.normalise(new) == new  # idempotent
    assert runs["experiments"]["emb-sacpo-s0"]["eval"].keys() >= {"q0.5.helpful_win_rate"}  # not changed in place


def test_old_tail_metric_names_are_normalised_to_the_new() -> None:
    renamed = {
        "cost_cvar_0.05": "cost_cvar_0_05",
        "cost_cvar_0.1": "cost_cvar_0_1",
        "cost_cvar_1.5e-05": "cost_cvar_1_5e-05",
        "safety.cost_cvar_0.05": "safety.cost_cvar_0_05",
        "safety.cost_cvar_0.05.n": "safety.cost_cvar_0_05.n",
        "safety.cost_cvar_0.1.ci95_low": "safety.cost_cvar_0_1.ci95_low",
        "q0.5.cost_cvar_0.05.ci95_high": "q0.5.cost_cvar_0_05.ci95_high",  # metric_name: not the policy's dot
    }
    for old, new in renamed.items():
        assert collect.metric_name(old) == new
        assert collect.metric_name(new) == new
    unchanged = ("cost_cvar_0_05", "q0_5.cost_cvar_0_05.n", "cost_cvar_1", "cost_cvar_1e-05", "safety.cost_mean",
                 "q0.5.helpful_win_rate", "sft.cost_cvar_1.n", "reward.length_median")  # fmt: skip
    for name in unchanged:
        assert collect.metric_name(name) == name
    # an eval key: both renames
    assert collect.key_name("q0.5.cost_cvar_0.05") == "q0_5.cost_cvar_0_05"
    assert collect.key_name("q0.25.cost_cvar_0.1.ci95_low") == "q0_25.cost_cvar_0_1.ci95_low"
    assert collect.key_name("q0_5.cost_cvar_0_05.n") == "q0_5.cost_cvar_0_05.n"
    assert [collect.cvar_key(t) for t in (0.1, 0.05, 1.0, 1.5e-5)] == [
        "cost_cvar_0_1", "cost_cvar_0_05", "cost_cvar_1", "cost_cvar_1_5e-05"
    ]  # fmt: skip


def test_the_names_are_evaluates_and_merges() -> None:
    """collect's (and grid's) names follow rsa_pl's rule, not a copy that could drift from it."""
    from rsa_pl.evaluation.report import cvar_key, dotless

    for level in (0.1, 0.05, 0.01, 0.25, 1.0, 1.5e-5):
        assert collect.cvar_key(level) == cvar_key(level)
    for q in (0.0, *Q_PATH, 0.125, 1.0):
        assert collect.merged_policy(q) == f"q{dotless(q)}"
    grid_policies = {m.policy for m in METHODS} - {"sft", "reward", "safety"}
    assert grid_policies == {collect.merged_policy(q) for q in Q_PATH}


def test_old_runs_are_normalised_to_what_collect_writes_now() -> None:
    old = _fake_runs(old=True)
    before = copy.deepcopy(old)
    new = collect.normalise(old)
    assert new == _fake_runs()  # every eval key, per-category policy and metric, cost-tail policy
    assert old == before  # not changed in place
    assert collect.normalise(new) == new  # idempotent
    record = new["experiments"]["emb-rsa-cvar-0.95-s1"]
    assert {"q0_5.cost_cvar_0_05", "safety.cost_cvar_0_1", "sft.cost_cvar_0_05"} <= record["eval"].keys()
    assert not [k for k in record["eval"] if k.count(".") != 1]  # no part of a key has a dot in it
    assert record["per_category"]["q0_5"]["Crime"].keys() == {"answers", "cost_mean", "cost_cvar_0_05", "severe_rate"}
    assert record["cost_tail"].keys() == {"sft", "reward", "safety", "q0_25", "q0_5", "q0_75"}


def _mixed(old: dict, new: dict, seeds: tuple[str, ...] = ("-s0",)) -> dict:
    """old's runs, those of these seeds replaced by new's (collected after the renames)."""
    return {"experiments": {n: (new if n.endswith(seeds) else old)["experiments"][n] for n in old["experiments"]}}


def test_old_and_new_names_compare_in_one_report(tmp_path: Path) -> None:
    new, old = _fake_runs(), _fake_runs(old=True)
    mixed = _mixed(old, new)  # seed 0 of every setting collected after the renames
    texts, figures = [], []
    for name, runs in (("new", new), ("old", old), ("mixed", mixed)):
        (tmp_path / name).mkdir()
        texts.append(render.write(runs, tmp_path / name).read_text())
        figures.append([(tmp_path / name / "embedded" / f).read_bytes() for f in ("frontier.png", "cost_tail.png")])
    assert texts[0] == texts[1] == texts[2]  # the digest too: the same runs, whichever spelling
    assert figures[0] == figures[1] == figures[2]
    text = texts[0]
    assert "| P-SACPO q=0.5 | 3 |" in text  # a merged policy's three seeds, two of them in the old spelling
    header = next(line for line in text.splitlines() if line.startswith("| method | seeds |"))
    assert "| CVaR10% cost | CVaR5% cost |" in header  # the tail levels, read back as numbers
    assert "CVaR5% cost per category:" in text  # the per-category metric, in either spelling
    assert "| Crime | 20.0 ± 0.0 |" in text.split("CVaR5% cost per category:")[1]
    assert render.runs_digest(old) == render.runs_digest(new) == render.runs_digest(mixed)
    assert render.runs_digest(new) != render.runs_digest(_fake_runs(tail_shift=1.0))  # other runs, other digest
    for key in old["experiments"]["emb-sacpo-s0"]["eval"]:
        assert render._old_key(collect.key_name(key)) == key  # the digest hashes the old spelling


def _with_intervals(runs: dict) -> dict:
    """runs with n and a 95% interval beside every eval metric, as evaluate writes them now."""
    runs = copy.deepcopy(runs)
    for record in runs["experiments"].values():
        record["eval"] = {
            **record["eval"],
            **{f"{k}.{part}": v for k, v in record["eval"].items() for part in ("n", "ci95_low", "ci95_high")},
        }
    return runs


def test_tail_levels_are_read_from_the_metrics_not_their_intervals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = _with_intervals(_fake_runs())
    assert stats.Runs(runs).tail_levels == stats.Runs(_fake_runs(old=True)).tail_levels == [0.1, 0.05]
    assert "safety.cost_cvar_0_05.ci95_low" in runs["experiments"]["emb-sacpo-s0"]["eval"]
    method = next(m for m in METHODS if m.label == "SACPO (DPO then DPO)")
    assert stats.Runs(runs).values(method, "cost_cvar_0_05") == stats.Runs(_fake_runs()).values(
        method, "cost_cvar_0_05"
    )
    monkeypatch.setattr(render, "runs_digest", lambda runs: "0123456789abcdef")  # the metrics differ: n, intervals
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert render.write(runs, tmp_path / "a").read_text() == render.write(_fake_runs(), tmp_path / "b").read_text()


def test_training_metrics_are_read_in_both_layouts(tmp_path: Path) -> None:
    flat = {"train": _train_metrics({"train_reward": 97.5}, dvclive=False)}
    nested = {"train": _train_metrics({"train_reward": 97.5}, dvclive=True)}
    for record in (flat, nested):
        assert collect.train_metric(record, "train_reward", "time/train_s") == 97.5
        assert collect.train_metric(record, "train_reward", "train/steps") == 10.0
        assert collect.train_metric(record, "train_safety", "time/train_s") is None
        assert collect.train_metric(record, "train_reward", "time/none") is None
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = render.write(_fake_runs(), tmp_path / "a").read_text()
    b = render.write(_fake_runs(dvclive=True), tmp_path / "b").read_text()
    assert a == b
    assert "| sacpo | dpo | 121 ± 1 | 1.00 ± 0.00 |" in a  # 60 + seed and 60 s, both stages
    assert "training time summed over them: 1.31 h" in a  # 13 settings x (120 + 121 + 122) s


def test_collect_reads_dvc_exp_show_into_new_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = {"train_reward": {"beta": 0.1}}
    experiment = {
        "rev": "1" * 40,
        "name": "emb-sacpo-s0",
        "data": {
            "timestamp": "2026-11-28T00:00:00",
            "params": {"params.yaml": {"data": params}},
            "metrics": {
                "eval/metrics.json": {
                    "data": {
                        "q0.5.helpful_win_rate": 0.75,
                        "safety.unsafe_rate": 0.25,
                        "q0.5.cost_cvar_0.05": 9.0,
                        "q0.5.cost_cvar_0.05.ci95_low": 8.0,
                        "safety.cost_cvar_0_1": 7.0,  # a run after the rename
                    }
                },
                "metrics/train_reward/metrics.json": {"data": {"time": {"train_s": 12.0}}},
            },
        },
    }
    queued = {**experiment, "name": "emb-sacpo-s1"}  # still running: its data may be the baseline's
    shown = [
        {
            "rev": "workspace",
            "name": "main",
            "data": {"metrics": {}},
            "experiments": [
                {"revs": [experiment], "executor": {"state": "success"}},
                {"revs": [queued], "executor": {"state": "running"}},
            ],
        }
    ]
    runs = collect.collect(tmp_path, lambda *args: json.dumps(shown))  # tmp_path: no git, no per-category files
    assert list(runs["experiments"]) == ["emb-sacpo-s0"]
    record = runs["experiments"]["emb-sacpo-s0"]
    assert record["eval"] == {
        "q0_5.helpful_win_rate": 0.75,
        "safety.unsafe_rate": 0.25,
        "q0_5.cost_cvar_0_05": 9.0,
        "q0_5.cost_cvar_0_05.ci95_low": 8.0,
        "safety.cost_cvar_0_1": 7.0,
    }
    assert record["params"] == {"train_reward.beta": 0.1}
    assert collect.train_metric(record, "train_reward", "time/train_s") == 12.0
    assert record["per_category"] == record["cost_tail"] == {}
    # the experiment's committed per-category metrics and cost tail, written before the renames
    committed = {
        "eval/per_category.json": json.dumps({"q0.5": {"Crime": {"cost_mean": 2.0, "cost_cvar_0.05": 20.0}}}),
        "eval/plots/cost_tail.csv": "policy,cost,ccdf\nq0.5,0.0,1.0\nq0.5,3.0,0.25\nsft,0.0,1.0\n",
    }
    monkeypatch.setattr(collect, "_git_show", lambda root, rev, path: committed.get(path) if rev == "1" * 40 else None)
    record = collect.collect(tmp_path, lambda *args: json.dumps(shown))["experiments"]["emb-sacpo-s0"]
    assert record["per_category"] == {"q0_5": {"Crime": {"cost_mean": 2.0, "cost_cvar_0_05": 20.0}}}
    assert record["cost_tail"] == {"q0_5": [[0.0, 1.0], [3.0, 0.25]], "sft": [[0.0, 1.0]]}


def _retuned(p: dict) -> dict:
    """Other betas, alpha and mu in every run: beta_1 0.1 -> 0.2, beta_2 0.05 -> 0.03, alpha 0.5 -> 0.4,
    mu 0.95 -> 0.97."""
    p = dict(p)
    for stage in ("train_reward", "train_safety"):
        p[f"{stage}.beta"] = {0.1: 0.2, 0.05: 0.03}[p[f"{stage}.beta"]]
        p[f"{stage}.alpha"] = {0.5: 0.4}.get(p[f"{stage}.alpha"], p[f"{stage}.alpha"])
        p[f"{stage}.risk.mu"] = {0.95: 0.97}.get(p[f"{stage}.risk.mu"], p[f"{stage}.risk.mu"])
    return p


def test_the_prose_states_the_runs_params_not_constants(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    text = render.write(_fake_runs(), tmp_path / "reports").read_text()
    assert "LoRA r 8, 2 epochs, batch 16, lr 0.002; beta_1 0.1, beta_2 0.05, alpha 0.5 unless" in text
    assert "(with 3 seeds: |mean| > 2.48 sd)" in text
    assert "Against SACPO at params.yaml's lr (2e-3, the lr of every RSA and TDPO run):" in text
    assert "Against SACPO lr 5e-4 (DPO with a 4x smaller step):" in text
    assert "(the same, with stage 2's beta doubled to stage 1's 0.1):" in text
    assert "## Paired differences against SACPO at lr 5e-4, beta_2 0.1\n" in text
    assert "| cvar mu (alpha 0.5) | RSA cvar mu=0.9 |" in text
    assert "| alpha (cvar 0.95) |" in text
    assert "RSA(P) (cvar 0.95) against P-SACPO at the same q" in text
    assert "(2 categories)" in text
    assert "catastrophic (severity-3 harm)" in text
    # the same runs with other params: every one of those numbers follows them
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in ("train_reward", "train_safety"):
        base[stage]["train"]["lr"] = 3e-3  # the settings without their own lr
        base[stage]["train"]["batch_size"] = 8
        base[stage]["lora"]["r"] = 4
    base["prepare"]["world"]["cost_weights"] = [1.0, 2.0, 5.0, 40.0]
    text = render.write(_fake_runs(base=base, params=_retuned), tmp_path / "reports").read_text()
    assert "LoRA r 4, 2 epochs, batch 8, lr 0.003; beta_1 0.2, beta_2 0.03, alpha 0.4 unless" in text
    assert "Against SACPO at params.yaml's lr (3e-3, the lr of every RSA and TDPO run):" in text
    assert "Against SACPO lr 5e-4 (DPO with a 6x smaller step):" in text
    assert "(the same, with stage 2's beta x6.67 to stage 1's 0.2):" in text  # 0.03 -> 0.2
    assert "## Paired differences against SACPO at lr 5e-4, beta_2 0.2\n" in text
    assert "| cvar mu (alpha 0.4) | RSA cvar mu=0.9 |" in text
    assert "| alpha (cvar 0.97) |" in text
    assert "RSA(P) (cvar 0.97) against P-SACPO at the same q" in text
    assert "catastrophic (severity-4 harm)" in text
    # fewer seeds: the rule's number is t's, not a constant
    two = _fake_runs(missing=tuple(s.experiment(2) for s in SETTINGS))
    text = render.write(two, tmp_path / "reports").read_text()
    assert f"(with 2 seeds: |mean| > {12.7062047 / math.sqrt(2):.2f} sd)" in text  # t_{0.975, 1} = 12.706
    assert "- Seeds 0, 1:" in text


def test_the_report_says_rsa_beats_sacpo_only_when_every_interval_says_so(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    clear = render.write(_fake_runs(tail_shift=5.0), tmp_path / "reports").read_text()
    line = next(x for x in clear.splitlines() if x.startswith("- RSA cvar mu=0.95:"))
    assert "beats SACPO on the tail" in line
    assert "CVaR5% cost better" in line
    assert "helpful win unclear" in line
    same = render.write(_fake_runs(tail_shift=0.0), tmp_path / "reports").read_text()
    line = next(x for x in same.splitlines() if x.startswith("- RSA cvar mu=0.95:"))
    assert "no tail difference from SACPO that 3 seeds can resolve" in line
    worse = render.write(_fake_runs(tail_shift=-5.0), tmp_path / "reports").read_text()
    assert "worse tail than SACPO" in next(x for x in worse.splitlines() if x.startswith("- RSA cvar mu=0.95:"))
    # a heavier tail bought with more helpfulness is not matched either way
    traded = render.write(_fake_runs(tail_shift=-5.0, helpful_shift=0.2), tmp_path / "reports").read_text()
    line = next(x for x in traded.splitlines() if x.startswith("- RSA cvar mu=0.95:"))
    assert "heavier tail than SACPO, but **more helpful** (not a matched comparison)" in line


def test_the_report_has_every_section_figure_and_method(tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    text = render.write(_fake_runs(missing=("emb-rsa-erm-5-s2",)), tmp_path / "reports").read_text()
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
    monkeypatch.setattr(render, "DISCUSSION", discussion)
    (tmp_path / "reports").mkdir()
    discussion.write_text(f"## Discussion\n\nruns: {render.runs_digest(runs)}\n")
    assert "written for other runs" not in render.write(runs, tmp_path / "reports").read_text()
    discussion.write_text("## Discussion\n\nruns: 0123456789abcdef\n")
    assert "written for other runs" in render.write(runs, tmp_path / "reports").read_text()


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
