"""The embedded-world tail experiment (experiments/): its grid is valid params of the one DAG, and
the report is computed from runs.json as it says (means, spreads, paired differences, matched
drift, the control): collect reads the runs (old and new policy and tail-metric names, both
training-metrics layouts), stats gives the numbers (scipy's t quantiles), render writes them, every
number of its prose read from the runs."""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
from pathlib import Path
from unittest import mock

import pytest
import yaml

from experiments import collect, embedded, render, stats
from experiments.grid import ANCHORING, HEADLINE, METHODS, SEEDS, SETTINGS, SHARP, SHARP_WORLD, queue_order, tier
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
    for seed in setting.seeds:
        path = tmp_path / f"s{seed}.yaml"
        path.write_text(yaml.safe_dump(_apply(base, setting.overrides(seed))))
        params = load_params(path)
        assert params.train_reward.train.seed == params.train_safety.train.seed == seed
        seen_seeds.add(params.evaluate.seed)
        assert {params.train_reward.pairs, params.train_safety.pairs} == {"helpful", "safety"}
        assert list(params.merge.q) == list(setting.q)
        assert params.evaluate.policies == list(setting.policies)
        sharp = params.prepare.world.harmful.catastrophe == 0.02 and not params.prepare.world.reward.catastrophe_helpful
        assert sharp == (setting.group == "sharp")
    assert len(seen_seeds) == len(setting.seeds)  # sampling differs between seeds too


def test_the_sharp_worlds_overrides_are_configs_sharp_yaml() -> None:
    """The sharp settings' world is the preset's: params.yaml with SHARP_WORLD applied is configs/sharp.yaml."""
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert _apply(base, dict(SHARP_WORLD)) == yaml.safe_load((ROOT / "configs" / "sharp.yaml").read_text())


def test_the_grid_has_the_issues_methods() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    by_name = {s.name: s for s in SETTINGS}
    headline = {(s.stage2.loss, s.stage2.measure, s.stage2.mu) for s in HEADLINE}
    assert headline >= {("tdpo", "kl", 1.0), ("rsa", "cvar", 0.95), ("rsa", "cvar", 1.0), ("rsa", "cvar_lower", 0.9),
                        ("rsa", "cvar_lower", 0.95), ("rsa", "erm_lower", 0.5),
                        ("rsa", "cvar_radpo", 0.95)}  # fmt: skip
    for s in HEADLINE:  # both stages the method's, at alpha 0.5, 5 seeds
        assert (s.stage1.loss, s.stage1.measure, s.stage1.mu) == (s.stage2.loss, s.stage2.measure, s.stage2.mu)
        assert s.stage1.alpha == s.stage2.alpha == 0.5
        assert s.seeds == SEEDS == (0, 1, 2, 3, 4)
    reverse = by_name["rsa-cvar-0.95-safety-first"]
    assert (reverse.stage1.pairs, reverse.stage2.pairs) == ("safety", "helpful")
    curves = {(s.stage2.measure, s.stage2.alpha) for s in ANCHORING}
    assert curves == {("kl", 0.25), ("kl", 0.35), ("kl", 0.75), ("kl", 1.0), ("kl", 1.5), ("cvar", 0.25),
                      ("cvar", 0.35), ("cvar_lower", 1.0)}  # fmt: skip
    for s in ANCHORING:  # only stage 2 moves: stage 1 is the headline's, restored from DVC's run-cache
        base = by_name[s.name.rsplit("-a", 1)[0]]
        assert s.stage1 == base.stage1
        assert s.stage2.measure == base.stage2.measure
        assert len(s.seeds) == 3
        assert s.policies == ("safety",)
    assert {s.name.removeprefix("sharp-") for s in SHARP} == {s.name for s in HEADLINE} - {"rsa-cvar-1"}
    assert all(s.world == SHARP_WORLD and len(s.seeds) == 3 for s in SHARP)


def test_every_method_row_names_a_policy_its_setting_evaluates() -> None:
    by_name = {s.name: s for s in SETTINGS}
    for method in METHODS:
        setting = by_name[method.setting]
        assert method.policy in setting.policies, method
        assert "." not in method.policy, method  # a key's part: <policy>.<metric> splits on dots
    assert len({(m.label, m.group) for m in METHODS}) == len(METHODS)


DRIFT_SCALE = {
    "kl": 2.0,
    "cvar": 1.6,
    "cvar_lower": 2.6,
    "erm_lower": 2.4,
    "cvar_radpo": 1.8,
}  # KL to stage 1 = scale / alpha: upper anchors harder


def _fake_runs(
    tail_shift: float = 0.0,
    missing: tuple[str, ...] = (),
    helpful_shift: float = 0.0,
    shifted: str = "rsa-cvar-0.95",
    base: dict | None = None,
    control_gap: float = 0.0,
    dvclive: bool = False,
    old: bool = False,
) -> dict:
    """runs.json as collect writes it (or, if old, with merged policies and tail metrics in the
    spelling before the renames), with metrics a known function of (setting, policy, seed): the
    stage-2 policy's KL to stage 1 is DRIFT_SCALE[measure] / alpha and its tail a linear function of
    that KL, so every measure lies on TDPO's curve unless shifted (the settings whose name starts so,
    by tail_shift, lower is better; helpful_shift on their helpful win rate); the control equals
    TDPO up to control_gap."""
    cvar_10, cvar_5 = ("cost_cvar_0.1", "cost_cvar_0.05") if old else ("cost_cvar_0_1", "cost_cvar_0_05")
    base = base or yaml.safe_load((ROOT / "params.yaml").read_text())
    experiments = {}
    for setting in SETTINGS:
        for seed in setting.seeds:
            name = setting.experiment(seed)
            if name in missing:
                continue
            evaluation, per_category, tails = {}, {}, {}
            core = setting.name.removeprefix("sharp-")
            mine = core.startswith(shifted) and "safety-first" not in core
            for policy in setting.policies:
                noise = 0.001 * ((seed * 7 + len(policy)) % 5 - 2)  # differs by seed: intervals have width
                measure = "kl" if setting.stage2.mu == 1.0 else setting.stage2.measure  # cvar at mu 1 is the KL
                kl = DRIFT_SCALE[measure] / setting.stage2.alpha if policy == "safety" else 1.0
                shift = tail_shift if mine and policy == "safety" else 0.0
                values = {
                    "helpful_win_rate": 0.6 + noise + (helpful_shift if mine and policy == "safety" else 0.0),
                    "harmless_win_rate": 0.5 + noise,
                    "reward_mean": 1.5 + noise,
                    "cost_mean": 2.0 + noise,
                    "unsafe_rate": 0.4 + noise,
                    cvar_10: 10.0 + noise,
                    cvar_5: 20.0 + 2.0 * kl + noise - shift,
                    "severe_rate": 0.05 + 0.01 * kl + noise / 10 - shift / 100,
                    "catastrophe_prob": 10 ** (-4 + 0.2 * kl - shift / 5 + noise),  # log-linear in the KL
                    "catastrophe_prob_geomean": 1e-6 * (1 + kl),
                    "needless_refusal_rate": 0.01,
                    "length_mean": 25.0,
                    "length_median": 25.0,
                    "kl_to_sft": 1.0 + kl / 2,
                    **({"kl_to_stage1": kl + noise} if policy == "safety" else {}),
                }
                if setting.name == "rsa-cvar-1":
                    values = {k: v + control_gap for k, v in values.items()}
                merged = {"q0_5": "q0.5"}.get(policy, policy) if old else policy
                evaluation |= {f"{merged}.{k}": v for k, v in values.items()}
                per_category[merged] = {
                    c: {"answers": 96.0, "cost_mean": 2.0 + seed, cvar_5: 20.0, "severe_rate": 0.05}
                    for c in ("Crime", "Insult")
                }
                tails[merged] = [[0.0, 1.0], [1.0, 0.5], [30.0 + seed, 0.05]]
            experiments[name] = {
                "setting": setting.name,
                "seed": seed,
                "rev": "0" * 40,
                "timestamp": "2026-12-02T00:00:00",
                "params": collect.flatten(_apply(base, setting.overrides(seed))),
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
    assert stats.classify([1.8e-16, 1.8e-16, 1.7e-16], "unsafe_rate") == "unclear"  # rounding, not a difference


def test_old_names_are_normalised_to_the_new() -> None:
    assert collect.policy_name("q0.5") == "q0_5"
    assert collect.policy_name("q0.25.helpful_win_rate") == "q0_25.helpful_win_rate"
    assert collect.policy_name("q0.5.cost_cvar_0.05") == "q0_5.cost_cvar_0.05"  # only the policy's dot
    for unchanged in ("q0_5", "q1", "q0", "sft", "safety.unsafe_rate"):
        assert collect.policy_name(unchanged) == unchanged
    assert [collect.merged_policy(q) for q in (0.0, 0.25, 0.5, 1.0)] == ["q0", "q0_25", "q0_5", "q1"]
    assert collect.metric_name("safety.cost_cvar_0.05.n") == "safety.cost_cvar_0_05.n"
    assert collect.metric_name("q0.5.cost_cvar_0.05") == "q0.5.cost_cvar_0_05"  # metric_name: not the policy's dot
    assert collect.metric_name("cost_cvar_1.5e-05") == "cost_cvar_1_5e-05"
    assert collect.key_name("q0.25.cost_cvar_0.1.ci95_low") == "q0_25.cost_cvar_0_1.ci95_low"
    old = _fake_runs(old=True)
    before = copy.deepcopy(old)
    new = collect.normalise(old)
    assert new == _fake_runs()  # every eval key, per-category policy and metric, cost-tail policy
    assert old == before  # not changed in place
    assert collect.normalise(new) == new  # idempotent


def test_the_names_are_evaluates_and_merges() -> None:
    """collect's (and grid's) names follow rsa_pl's rule, not a copy that could drift from it."""
    from rsa_pl.evaluation.report import cvar_key, dotless

    for level in (0.1, 0.05, 0.01, 0.25, 1.0, 1.5e-5):
        assert collect.cvar_key(level) == cvar_key(level)
    for q in (0.0, 0.25, 0.5, 0.125, 1.0):
        assert collect.merged_policy(q) == f"q{dotless(q)}"
    assert {m.policy for m in METHODS} - {"sft", "reward", "safety"} == {collect.merged_policy(0.5)}


def test_training_metrics_are_read_in_both_layouts(tmp_path: Path) -> None:
    flat = {"train": _train_metrics({"train_reward": 97.5}, dvclive=False)}
    nested = {"train": _train_metrics({"train_reward": 97.5}, dvclive=True)}
    for record in (flat, nested):
        assert collect.train_metric(record, "train_reward", "time/train_s") == 97.5
        assert collect.train_metric(record, "train_reward", "train/steps") == 10.0
        assert collect.train_metric(record, "train_safety", "time/train_s") is None
        assert collect.train_metric(record, "train_reward", "time/none") is None
    a = _report(tmp_path, _fake_runs(), "a")
    b = _report(tmp_path, _fake_runs(dvclive=True), "b")
    assert a == b
    assert "| tdpo | headline | 5 | 122 ± 2 |" in a  # 60 + seed and 60 s, both stages, seeds 0-4
    hours = sum(120 + seed for s in SETTINGS for seed in s.seeds) / 3600
    assert f"training time summed over them: {hours:.2f} h" in a


def _git(root: Path, *args: str, when: str | None = None) -> str:
    """git in root, as a fixed author (at a fixed date, if given)."""
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    if when:
        env |= {"GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when}
    done = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    return done.stdout.strip()


def _experiment_commit(root: Path, name: str, files: dict[str, str], when: str, baseline: str = "abcdef") -> str:
    """A commit holding files under refs/exps/<baseline>/<name>, as `dvc exp run` leaves one (a
    name run again on another baseline commit is another ref)."""
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    _git(root, "add", "-A")
    tree = _git(root, "write-tree")
    commit = _git(root, "commit-tree", tree, "-m", name, when=when)
    _git(root, "update-ref", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}", commit)
    _git(root, "rm", "-rq", "--cached", ".")
    for path in files:
        (root / path).unlink()
    return commit


def test_collect_refs_reads_the_experiment_commits_into_new_names(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    params = {"train_reward": {"beta": 0.1}}
    evaluation = {"q0.5.helpful_win_rate": 0.75, "q0.5.cost_cvar_0.05": 9.0, "safety.cost_cvar_0_1": 7.0}
    files = {
        "params.yaml": yaml.safe_dump(params),
        "eval/metrics.json": json.dumps(evaluation),
        "metrics/train_reward/metrics.json": json.dumps({"time": {"train_s": 12.0}}),
        # written before the renames: the per-category metrics and the cost tail
        "eval/per_category.json": json.dumps({"q0.5": {"Crime": {"cost_mean": 2.0, "cost_cvar_0.05": 20.0}}}),
        "eval/plots/cost_tail.csv": "policy,cost,ccdf\nq0.5,0.0,1.0\nq0.5,3.0,0.25\nsft,0.0,1.0\n",
    }
    older = {**files, "eval/metrics.json": json.dumps({"safety.cost_mean": 1.0})}
    _experiment_commit(tmp_path, "r2-tdpo-s0", older, "2026-11-27T00:00:00+00:00", baseline="012345")
    newest = _experiment_commit(
        tmp_path, "r2-tdpo-s0", files, "2026-11-28T00:00:00+00:00"
    )  # run again, on another commit
    _experiment_commit(tmp_path, "r2-tdpo-s0", older, "2026-11-26T00:00:00+00:00", baseline="6789ab")
    _experiment_commit(tmp_path, "r2-tdpo-s1", {"params.yaml": yaml.safe_dump(params)}, "2026-11-28T00:00:00+00:00")
    _experiment_commit(tmp_path, "not-in-the-grid", files, "2026-11-28T00:00:00+00:00")
    runs = collect.collect_refs(tmp_path)
    assert list(runs["experiments"]) == ["r2-tdpo-s0"]  # s1 has no evaluation: failed or unfinished
    record = runs["experiments"]["r2-tdpo-s0"]
    assert (record["setting"], record["seed"], record["rev"]) == ("tdpo", 0, newest)
    assert record["eval"] == {"q0_5.helpful_win_rate": 0.75, "q0_5.cost_cvar_0_05": 9.0, "safety.cost_cvar_0_1": 7.0}
    assert record["params"] == {"train_reward.beta": 0.1}
    assert collect.train_metric(record, "train_reward", "time/train_s") == 12.0
    assert record["per_category"] == {"q0_5": {"Crime": {"cost_mean": 2.0, "cost_cvar_0_05": 20.0}}}
    assert record["cost_tail"] == {"q0_5": [[0.0, 1.0], [3.0, 0.25]], "sft": [[0.0, 1.0]]}


def test_runs_json_keeps_what_this_clones_refs_lack() -> None:
    """The refs stay in the clone that ran the experiments; runs.json is the record: a report from
    a fresh clone keeps every recorded run, a newer run of a name replaces it, and a run whose
    params the grid no longer sets is dropped (and run queues it again)."""
    recorded = _fake_runs()
    names = sorted(recorded["experiments"])
    assert all(collect.matches_grid(name, record) for name, record in recorded["experiments"].items())
    assert collect.merge_runs(recorded, {"experiments": {}}) == recorded
    assert collect.merge_runs({}, recorded) == recorded  # no runs.json yet: the refs alone
    rerun = copy.deepcopy(recorded["experiments"][names[0]]) | {"timestamp": "2026-12-03T00:00:00", "rev": "1" * 40}
    stale = copy.deepcopy(recorded)
    stale["experiments"][names[1]]["params"]["train_safety.risk.mu"] = 0.123  # ran before the grid changed
    stale["experiments"]["r1-tdpo-s0"] = recorded["experiments"][names[2]]  # a name the grid does not make
    merged = collect.merge_runs(stale, {"experiments": {names[0]: rerun}})
    assert sorted(merged["experiments"]) == sorted(set(names) - {names[1]})
    assert merged["experiments"][names[0]]["rev"] == "1" * 40
    older = rerun | {"timestamp": "2026-01-01T00:00:00"}
    assert collect.merge_runs(recorded, {"experiments": {names[0]: older}})["experiments"][names[0]]["rev"] == "0" * 40


def test_run_counts_recorded_experiments_as_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _fake_runs(missing=("r2-tdpo-s4",))
    runs["experiments"]["r2-rsa-cvar-0.95-s0"]["params"]["evaluate.seed"] = 7  # not what the grid sets
    monkeypatch.setattr(embedded, "RUNS", tmp_path / "runs.json")
    assert embedded._recorded() == []
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    recorded = set(embedded._recorded())
    assert recorded == set(runs["experiments"]) - {"r2-rsa-cvar-0.95-s0"}


def _report(tmp_path: Path, runs: dict, name: str = "reports", figures: bool = False) -> str:
    """The report's text; without its figures unless asked (drawing them is most of write's time)."""
    (tmp_path / name).mkdir(exist_ok=True)
    if figures:
        return render.write(runs, tmp_path / name).read_text()
    skip = lambda *args, **kwargs: None  # noqa: E731
    with mock.patch.multiple(render, frontier_figure=skip, anchoring_figure=skip, tail_figure=skip):
        return render.write(runs, tmp_path / name).read_text()


def _line(text: str, start: str, after: str = "") -> str:
    return next(x for x in (text.split(after)[-1] if after else text).splitlines() if x.startswith(start))


def test_the_prose_states_the_runs_params_not_constants(tmp_path: Path) -> None:
    text = _report(tmp_path, _fake_runs())
    assert "LoRA r 8, 2 epochs, batch 16, lr 0.002; beta_1 0.1, beta_2 0.05, alpha 0.5 in both stages" in text
    assert "(3 seeds: |mean| > 2.48 sd; 5 seeds: > 1.24 sd)" in text  # t_{0.975, n-1} / sqrt(n)
    assert "catastrophe probability 0.05 after a harmful step, a catastrophic step counted" in text
    assert (
        "(`configs/sharp.yaml`: catastrophe probability 0.02 after a harmful step, a catastrophic step not counted"
        in text
    )
    assert "- Seeds: headline 0, 1, 2, 3, 4, anchoring 0, 1, 2, sharp world 0, 1, 2;" in text
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in ("train_reward", "train_safety"):
        base[stage]["train"]["batch_size"] = 8
        base[stage]["lora"]["r"] = 4
    base["prepare"]["world"]["harmful"]["catastrophe"] = 0.07
    text = _report(tmp_path, _fake_runs(base=base))
    assert "LoRA r 4, 2 epochs, batch 8, lr 0.002;" in text
    assert "catastrophe probability 0.07 after a harmful step" in text


def test_the_verdict_follows_the_paired_intervals(tmp_path: Path) -> None:
    label = "- RSA cvar 0.95 (upper tail):"
    # every measure on TDPO's line: at equal alpha the upper tail anchors harder (less KL), so its tail
    # is lighter there; that is the confound the matched-drift comparison removes
    same = _line(_report(tmp_path, _fake_runs()), label)
    assert "**lighter tail than TDPO**" in same
    assert "KL to stage 1 -0.80 against TDPO's" in same  # 1.6 / 0.5 - 2 / 0.5
    control = _line(_report(tmp_path, _fake_runs()), "- control: RSA cvar mu=1 (= KL):")
    assert "no tail difference from TDPO that 5 seeds can resolve" in control
    lighter = _line(_report(tmp_path, _fake_runs(tail_shift=5.0)), label)
    assert "CVaR5% cost better" in lighter
    heavier = _line(_report(tmp_path, _fake_runs(tail_shift=-10.0, helpful_shift=0.2)), label)
    assert "**heavier tail than TDPO**, and **more helpful**" in heavier
    mixed = _line(_report(tmp_path, _fake_runs(tail_shift=-1.0)), label)  # CVaR: -1.6 + 1; log10 P: -0.16 + 0.2
    assert "mixed: lighter on some tail metrics, heavier on others" in mixed
    # the sharp world has its own verdict lines, the same rule
    sharp = _report(tmp_path, _fake_runs(tail_shift=5.0))
    assert "**lighter tail than TDPO**" in _line(sharp, label, "At equal alpha, against TDPO, the sharp world:")


def test_matched_drift_compares_the_curves_at_the_same_kl(tmp_path: Path) -> None:
    """Every measure's tail is the same linear function of its KL as TDPO's: at matched drift there
    is no difference, although at equal alpha the upper tail anchors harder and so looks lighter."""
    runs = _fake_runs()
    view = stats.Runs(runs)
    curves = render.ANCHOR_CURVES
    assert curves[render.TDPO_LABEL] == ["tdpo", "tdpo-a0.25", "tdpo-a0.35", "tdpo-a0.75", "tdpo-a1", "tdpo-a1.5"]
    upper = curves["RSA cvar 0.95 (upper tail)"]
    for key in ("cost_cvar_0_05", "catastrophe_prob", "severe_rate"):
        diffs = render.matched_differences(view, upper, curves[render.TDPO_LABEL], key)
        assert len(diffs) == 3  # the anchoring seeds
        assert max(abs(d) for d in diffs) < 2e-3  # on the same line: only the runs' noise
    text = _report(tmp_path, runs)
    line = _line(text, "- RSA cvar 0.95 (upper tail), at matched drift:")
    assert "no tail difference from TDPO that 3 seeds can resolve" in line
    # a measure below TDPO's line: better at matched drift, by the shift (the points outside the
    # other curve's range are not extrapolated)
    shifted = stats.Runs(_fake_runs(tail_shift=5.0))
    diffs = render.matched_differences(shifted, upper, curves[render.TDPO_LABEL], "cost_cvar_0_05")
    assert statistics.fmean(diffs) == pytest.approx(-5.0, abs=0.01)
    lighter = _line(_report(tmp_path, _fake_runs(tail_shift=5.0)), "- RSA cvar 0.95 (upper tail), at matched drift:")
    assert "**lighter tail than TDPO**" in lighter
    # linear interpolation against a float64 hand computation: TDPO's curve at KL 3.2 (upper, alpha 0.5)
    curve = [(2 / a, 20 + 2 * (2 / a)) for a in (1.5, 1.0, 0.75, 0.5)]
    assert render._interpolate(curve, 3.2) == pytest.approx(20 + 6.4, rel=1e-12)
    assert render._interpolate(curve, 6.4) is None  # outside: no extrapolation


def test_the_control_check_reports_the_largest_difference(tmp_path: Path) -> None:
    equal = _report(tmp_path, _fake_runs())
    assert "the largest relative difference is 0.00e+00" in equal
    gap = _report(tmp_path, _fake_runs(control_gap=1e-4))
    assert "the largest relative difference is " in gap
    assert "0.00e+00" not in gap.split("The control, RSA")[1][:400]


def test_the_report_has_every_section_figure_and_method(tmp_path: Path) -> None:
    text = _report(tmp_path, _fake_runs(missing=("r2-rsa-erm_lower-0.5-s4",)), figures=True)
    for heading in ("## Setup", "## Verdict", "## Headline: every method", "## Headline: paired differences",
                    "## Anchoring curves", "## The decision points", "## The sharp world", "## The cost tail",
                    "## What the experiment cost"):  # fmt: skip
        assert heading in text
    for method in METHODS:
        if method.group != "anchoring":
            assert f"| {method.label} |" in text, method
    for figure in ("headline.png", "sharp.png", "anchoring.png", "cost_tail.png"):
        assert (tmp_path / "reports" / "embedded" / figure).stat().st_size > 10_000
        assert f"(embedded/{figure})" in text
    assert "| RSA erm_lower 0.5 (lower tail) | 4 |" in text  # the missing experiment: 4 seeds
    assert "| TDPO then TDPO | 5 |" in text
    assert "| RSA cvar 0.95 | 0.35 | 3 |" in text  # an anchoring row: measure, alpha, seeds


def test_a_discussion_written_for_other_runs_is_flagged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _fake_runs()
    discussion = tmp_path / "discussion.md"
    monkeypatch.setattr(render, "DISCUSSION", discussion)
    discussion.write_text(f"## Discussion\n\nruns: {render.runs_digest(runs)}\n")
    assert "written for other runs" not in _report(tmp_path, runs)
    discussion.write_text("## Discussion\n\nruns: 0123456789abcdef\n")
    assert "written for other runs" in _report(tmp_path, runs)
    assert render.runs_digest(runs) == render.runs_digest(_fake_runs(old=True))  # the same runs, either spelling
    assert render.runs_digest(runs) != render.runs_digest(_fake_runs(tail_shift=1.0))


def test_the_queue_runs_the_headline_seed_by_seed_first() -> None:
    order = queue_order()
    assert len(order) == len(set(order)) == sum(len(s.seeds) for s in SETTINGS)
    tiers = [tier(setting, seed) for setting, seed in order]
    assert tiers == sorted(tiers)
    first = [(setting.group, seed) for setting, seed in order[: tiers.count(0)]]
    assert {g for g, _ in first} == {"headline"}
    assert [seed for _, seed in first] == sorted(seed for _, seed in first) == [0] * 8 + [1] * 8 + [2] * 8
    assert tiers.count(1) == sum(len(s.seeds) for s in ANCHORING)  # then the curves, whose stage 1s tier 0 made
    assert [s.name for s, seed in order if seed == 0 and s.group == "headline"] == [s.name for s in HEADLINE]


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
