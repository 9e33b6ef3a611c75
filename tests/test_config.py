"""rsa_pl.config and rsa_pl.params_file: the committed params load; every bad value is reported with its key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from rsa_pl.config import Params
from rsa_pl.losses import preference_loss_from_logits
from rsa_pl.params_file import ParamsError, load_params, parse_params
from rsa_pl.pipeline.params_doc import params_reference

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def raw() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def problems_of(raw: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    return dict(caught.value.problems)


def test_committed_params_load() -> None:
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.train_safety.risk is not None
    assert params.train_reward.beta > params.train_safety.beta  # stage 2 realigns more strongly


def test_params_are_immutable() -> None:
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(ValueError, match="frozen"):
        params.train_safety.beta = 1.0  # type: ignore[misc]


def test_objective_drives_the_loss() -> None:
    params = load_params(ROOT / "params.yaml")
    logits = torch.randn(4, 3, 5)
    labels = torch.randint(0, 5, (4, 3))
    mask = torch.ones(4, 3, dtype=torch.bool)
    losses, metrics = preference_loss_from_logits(logits, logits + 0.1, labels, mask, **params.train_safety.objective())
    assert losses.shape == (2,)
    assert "risk/chosen" in metrics


@pytest.mark.parametrize(
    ("key_path", "value", "expected"),
    [
        ("train_safety.risk.mu", 1.5, "must be in (0, 1] for cvar, got 1.5"),
        ("train_safety.risk.mu", 0.0, "must be in (0, 1] for cvar, got 0.0"),
        ("train_safety.risk.mu", "0.9", "input should be a valid number"),
        (
            "train_safety.risk.measure",
            "cvr",
            "input should be 'kl', 'cvar', 'erm', 'cvar_radpo', 'cvar_lower' or 'erm_lower'",
        ),
        ("evaluate.judge", "gpt4", "input should be 'oracle', 'score_models', 'llm' or 'guard'"),
        ("merge.q", [0.5, 0.5], "each ratio once, got 0.5 more than once"),
        ("train_safety.beta", 0.0, "input should be greater than 0, got 0.0"),
        ("train_safety.beta", -1, "input should be greater than 0"),
        ("train_safety.beta", "0.1", "input should be a valid number, got '0.1'"),
        ("train_safety.beta", float("inf"), "input should be a finite number"),
        ("train_safety.beta", True, "input should be a valid number"),
        ("train_reward.alpha", -0.5, "input should be greater than or equal to 0"),
        ("train_reward.variant", 3, "input should be 1 or 2, got 3"),
        ("train_reward.loss", "ppo", "input should be 'dpo', 'tdpo' or 'rsa', got 'ppo'"),
        ("train_reward.risk", "cvar", "input should be a valid dictionary or instance of RiskParams"),
        ("train_reward", [1, 2], "input should be a valid dictionary or instance of PreferenceStageParams"),
    ],
)
def test_bad_values_name_their_key(raw: dict[str, Any], key_path: str, value: Any, expected: str) -> None:
    *parents, leaf = key_path.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    problems = problems_of(raw)
    assert list(problems) == [key_path]
    assert expected in problems[key_path]


def test_score_models_need_both_models(raw: dict[str, Any]) -> None:
    raw["evaluate"]["judge"] = "score_models"
    raw["evaluate"]["cost_model"] = "beaver-cost"
    expected = "required for judge score_models: a score model folder or hub id"
    assert problems_of(raw) == {"evaluate.reward_model": expected}


def test_the_llm_and_guard_judges_need_what_they_use(raw: dict[str, Any]) -> None:
    raw["evaluate"]["judge"] = "llm"
    assert problems_of(raw) == {"evaluate.llm.base_url": "required for judge llm",
                                "evaluate.llm.model": "required for judge llm"}  # fmt: skip
    raw["evaluate"]["llm"].update(base_url="http://localhost:8000/v1", model="judge")
    raw["evaluate"]["refusal"] = "either"
    parse_params(raw, "params.yaml")  # valid
    raw["evaluate"]["judge"] = "guard"
    assert problems_of(raw) == {
        "evaluate.guard.model": "required for judge guard: a chat model folder or hub id",
        "evaluate.refusal": "either needs the llm judge's refusal field (judge: llm)",
    }
    raw["evaluate"].update(refusal="patterns", reward_model="rm")
    raw["evaluate"]["guard"]["model"] = "guard"
    assert problems_of(raw) == {
        "evaluate.reward_model": "judge guard takes helpfulness from one of reward_model, llm or "
        "guard.rate_helpfulness; got reward_model and llm.base_url"
    }
    raw["evaluate"].update(reward_model=None)
    raw["evaluate"]["guard"]["rate_helpfulness"] = True
    assert problems_of(raw) == {
        "evaluate.llm.base_url": "judge guard takes helpfulness from one of reward_model, llm or "
        "guard.rate_helpfulness; got llm.base_url and guard.rate_helpfulness"
    }
    raw["evaluate"]["llm"]["base_url"] = None
    parse_params(raw, "params.yaml")  # the guard alone: its verdicts and its own ratings
    raw["evaluate"]["llm"]["timeout_s"] = 0.0
    assert "evaluate.llm.timeout_s" in problems_of(raw)


def test_error_is_one_line_per_problem_naming_file_and_key(raw: dict[str, Any]) -> None:
    raw["train_safety"]["risk"]["mu"] = 1.5
    with pytest.raises(ParamsError) as caught:
        parse_params(raw, "my/params.yaml")
    assert str(caught.value) == "my/params.yaml: train_safety.risk.mu: must be in (0, 1] for cvar, got 1.5"


@pytest.mark.parametrize(
    ("key_path", "typo", "suggestion"),
    [
        ("train_safety", "betta", "did you mean 'beta'?"),
        ("train_safety.risk", "measur", "did you mean 'measure'?"),
        ("", "train_safty", "did you mean 'train_safety'?"),
        ("train_reward", "zzz", "valid keys: pairs, loss, beta, alpha, variant, risk, lora, quantization, train"),
    ],
)
def test_unknown_keys_suggest_the_closest(raw: dict[str, Any], key_path: str, typo: str, suggestion: str) -> None:
    node = raw
    for part in filter(None, key_path.split(".")):
        node = node[part]
    node[typo] = 1
    problems = problems_of(raw)
    path = f"{key_path}.{typo}" if key_path else typo
    assert problems[path] == f"unknown key; {suggestion}"


def test_missing_keys_and_sections_are_named(raw: dict[str, Any]) -> None:
    del raw["train_safety"]["beta"]
    del raw["train_reward"]
    problems = problems_of(raw)
    assert problems["train_safety.beta"].startswith("missing")
    assert problems["train_reward"].startswith("missing")


def test_every_problem_is_reported_at_once(raw: dict[str, Any]) -> None:
    raw["train_reward"]["beta"] = -1.0
    raw["train_reward"]["variant"] = 0
    raw["train_reward"]["risk"]["mu"] = 1.5  # a valid nested section of a failing one: still checked
    raw["train_safety"]["risk"]["mu"] = 7.0  # cross-field, in a section whose fields are valid
    raw["train_safety"]["loss"] = "tdpo"  # cross-field too: tdpo needs measure kl
    raw["extra_section"] = {}
    problems = problems_of(raw)
    assert set(problems) == {
        "train_reward.beta",
        "train_reward.variant",
        "train_reward.risk.mu",
        "train_safety.risk.mu",
        "train_safety.risk.measure",
        "extra_section",
    }


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"loss": "dpo", "alpha": 0.5}, {"train_safety.alpha": "must be 0 for loss dpo"}),
        ({"loss": "tdpo"}, {"train_safety.risk.measure": "must be one of kl for loss tdpo, got 'cvar'"}),
        (
            {"loss": "rsa", "risk": {"measure": "kl", "mu": 1.0}},
            {"train_safety.risk.measure": "must be one of cvar, erm, cvar_radpo, cvar_lower, erm_lower for loss rsa"},
        ),
        ({"loss": "rsa", "risk": None}, {"train_safety.risk": "required for loss rsa"}),
        ({"loss": "rsa", "alpha": 0.0}, {"train_safety.alpha": "must be > 0 for loss rsa"}),
        ({"risk": {"measure": "erm", "mu": -2.0}}, {"train_safety.risk.mu": "must be in (0, inf) for erm"}),
        ({"risk": {"measure": "erm_lower", "mu": 2.0}}, {"train_safety.risk.mu": "must be in (0, 1] for erm_lower"}),
    ],
)
def test_cross_field_rules(raw: dict[str, Any], section: dict[str, Any], expected: dict[str, str]) -> None:
    raw["train_safety"].update(section)
    problems = problems_of(raw)
    assert set(problems) == set(expected)
    for key, message in expected.items():
        assert message in problems[key]


def test_valid_variations_load(raw: dict[str, Any]) -> None:
    for change in (
        {"loss": "dpo", "alpha": 0.0, "risk": None},
        {"loss": "dpo", "alpha": 0, "risk": {"measure": "cvar", "mu": 0.9}},
        {"loss": "tdpo", "variant": 1, "alpha": 1.0, "risk": {"measure": "kl", "mu": 1.0}},
        {"loss": "rsa", "risk": {"measure": "erm", "mu": 5}},
    ):
        variant = copy.deepcopy(raw)
        variant["train_safety"].update(change)
        parse_params(variant)


@pytest.mark.parametrize("stage", ["train_reward", "train_safety"])
@pytest.mark.parametrize(("measure", "mu"), [("cvar_lower", 0.95), ("erm_lower", 0.5), ("erm_lower", 1)])
def test_the_lower_tail_measures_are_selectable_in_both_stages(
    raw: dict[str, Any], stage: str, measure: str, mu: float
) -> None:
    raw[stage].update({"loss": "rsa", "risk": {"measure": measure, "mu": mu}})
    objective = getattr(parse_params(raw), stage).objective()
    assert (objective["measure"], objective["mu"]) == (measure, mu)


def test_yaml_exponent_floats_are_numbers(tmp_path: Path, raw: dict[str, Any]) -> None:
    text = (ROOT / "params.yaml").read_text().replace("beta: 0.05", "beta: 5e-2")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_params(path).train_safety.beta == pytest.approx(0.05)


def test_file_problems_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"nope\.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train_reward:\n  beta: [0.1\n")
    with pytest.raises(ParamsError, match=r"broken\.yaml: line 3: invalid YAML"):
        load_params(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ParamsError, match=r"scalar\.yaml: must be a mapping of sections, got int"):
        load_params(scalar)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ParamsError, match=r"binary\.yaml: cannot read"):
        load_params(binary)


def test_the_paper_preset_loads_and_says_what_it_is() -> None:
    """configs/paper.yaml: the paper's setting; it needs GPUs and the hub to run, but it must load."""
    params = load_params(ROOT / "configs" / "paper.yaml")
    assert params.prepare.source.kind == "pku_saferlhf"
    assert params.prepare.source.path == "PKU-Alignment/PKU-SafeRLHF-30K"
    assert params.sft.model.name_or_path == "PKU-Alignment/alpaca-7b-reproduced"
    assert params.prepare.max_length == 512
    for stage in (params.train_reward, params.train_safety):
        assert stage.quantization is not None
        assert stage.quantization.quant_type == "nf4"
        assert stage.lora is not None
        t = stage.train
        assert (t.batch_size, t.accumulate_grad_batches, t.lr, t.max_epochs) == (16, 2, 2e-5, 3)
        assert (t.precision, t.strategy, t.devices) == ("bf16-mixed", "ddp", 2)
    assert params.evaluate.judge == "score_models"
    assert params.evaluate.cost_model == "PKU-Alignment/beaver-7b-v1.0-cost"


def test_the_params_reference_is_up_to_date() -> None:
    """docs/params.md lists every key with its meaning; regenerate:
    python -m rsa_pl.pipeline.params_doc > docs/params.md"""
    params = load_params(ROOT / "params.yaml")
    reference = (ROOT / "docs" / "params.md").read_text()
    assert params_reference(params) in reference
    keys = [line.split("`")[1] for line in reference.splitlines() if line.startswith("| `")]
    assert all(line.rstrip().endswith("|") and not line.rstrip().endswith("|  |") for line in reference.splitlines()
               if line.startswith("| `")), "a key without a meaning: give its field a docstring"  # fmt: skip
    assert len(keys) > 100


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}.{key}" if prefix else key)]
    return [prefix]


def test_a_wrong_type_for_any_key_is_one_line_naming_that_key() -> None:
    """Every key of the committed params, given a value of the wrong type, is reported by its
    dotted path (and only that key), in one line."""
    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    keys = _leaves(committed)
    assert len(keys) > 100
    for key in keys:
        raw = copy.deepcopy(committed)
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = 12345 if isinstance(node[leaf], str) else [12345] if node[leaf] is None else "not-a-valid-value"
        with pytest.raises(ParamsError) as caught:
            parse_params(raw, "p.yaml")
        lines = str(caught.value).splitlines()
        named = [line.split(": ")[1] for line in lines]  # the key, or its list's element (key.0)
        assert named in ([key], [f"{key}.0"]), (key, lines)


def test_sections_a_mode_does_not_use_may_be_null(raw: dict[str, Any]) -> None:
    """A real-data params file need not carry the embedded world or the scratch model; the modes
    that use them still require them, by key."""
    raw["prepare"]["world"] = None
    raw["sft"]["train"] = raw["sft"]["sample"] = None
    for key in ("architecture", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
        raw["sft"]["model"][key] = None
    problems = problems_of(raw)
    assert problems["prepare.world"] == "required for source embedded (the world to generate)"
    assert problems["sft.train"] == problems["sft.sample"] == "required for a scratch base (sft.model.kind: scratch)"
    assert problems["sft.model.hidden_size"] == "required for kind scratch (the model to build)"
    assert len(problems) == 9
    raw["prepare"]["source"].update(kind="jsonl", path="pairs.jsonl")
    raw["prepare"]["tokenizer"].update(kind="pretrained", name_or_path="my/model", vocab_size=None)
    raw["sft"]["model"].update(kind="pretrained", name_or_path="my/model")
    raw["evaluate"].update(judge="score_models", reward_model="rm", cost_model="cm")
    parse_params(raw, "params.yaml")  # a real-data file without the world and the scratch model
