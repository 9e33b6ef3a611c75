"""Safe loading: no pickle for models or checkpoints, no remote code, only what params name."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from rsa_pl.config import GuardParams, QuantizationParams
from rsa_pl.errors import PickledCodeError, RemoteCodeError
from rsa_pl.evaluation.guard import GuardJudge
from rsa_pl.evaluation.judges import ScoreModel
from rsa_pl.models import load_aligned_policy, load_causal_lm, load_quantized, load_tokenizer
from rsa_pl.params_file import load_params
from rsa_pl.pipeline import evaluate, preference, sft
from rsa_pl.pipeline.artifacts import BASE_RECORD, trusts_code
from rsa_pl.pipeline.cli import app
from rsa_pl.training import FINGERPRINT, LAST
from tests.helpers import stage_params

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("rsa_pl/**/*.py"))
QUIET = Console(quiet=True)
# transformers' entry points the package loads models, tokenizers and configs through
AUTO_CLASSES = (AutoConfig, AutoTokenizer, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification)


@dataclass
class Load:
    what: str  # e.g. AutoTokenizer.from_pretrained
    caller: str  # module:line of the package's code that called it
    kwargs: dict[str, Any]


@pytest.fixture
def hf_loads(monkeypatch: pytest.MonkeyPatch) -> list[Load]:
    """Every from_pretrained call that the package's own code makes on transformers' Auto classes,
    with its keyword arguments; each is wrapped, not replaced (the call goes through unchanged)."""
    loads: list[Load] = []
    for cls in AUTO_CLASSES:

        def wrapper(*args: Any, _original: Any = cls.from_pretrained, _what: str = cls.__name__, **kwargs: Any) -> Any:
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("rsa_pl."):  # not transformers' own inner calls
                loads.append(Load(f"{_what}.from_pretrained", f"{module}:{caller.f_lineno}", kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", staticmethod(wrapper))
    return loads


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every torch.load call (the package's and Lightning's), as (the file, its keyword arguments);
    wrapped, not replaced."""
    loads: list[tuple[str, dict[str, Any]]] = []
    original = torch.load

    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        loads.append((str(getattr(f, "name", f)), kwargs))  # Lightning passes an open file
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return loads


class RunsCode:
    """Unpickling this opens (creates) a file: a stand-in for code a pickle can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@dataclass(frozen=True)
class JudgeModels:
    root: Path  # the session's pipeline (models/sft, models/reward, data/tokenizer)
    reward: Path  # a one-output sequence classifier
    cost: Path  # a two-label (safe, unsafe) classifier
    safe_rlhf: Path  # a LlamaForScore backbone (safetensors) with its score head in a .bin file
    guard: Path  # a chat model


@pytest.fixture(scope="module")
def judge_models(tmp_path_factory: pytest.TempPathFactory, pipeline_root: Path) -> JudgeModels:
    """Tiny judge models built from configs, with the session's tokenizer."""
    folder = tmp_path_factory.mktemp("judges")
    tokenizer = AutoTokenizer.from_pretrained(str(pipeline_root / "data" / "tokenizer"))

    def config(**extra: Any) -> LlamaConfig:
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=tokenizer.pad_token_id, **extra)  # fmt: skip

    reward, cost, safe_rlhf, guard = (folder / name for name in ("reward", "cost", "safe_rlhf", "guard"))
    LlamaForSequenceClassification(config(num_labels=1)).save_pretrained(reward)
    labels = {"id2label": {0: "safe", 1: "unsafe"}, "label2id": {"safe": 0, "unsafe": 1}}
    LlamaForSequenceClassification(config(**labels)).save_pretrained(cost)
    backbone = LlamaModel(config())
    backbone.save_pretrained(safe_rlhf)
    save_file({f"model.{k}": v for k, v in backbone.state_dict().items()}, str(safe_rlhf / "model.safetensors"))
    torch.save({"score_head.weight": torch.randn(1, 16), "score_head.bias": torch.randn(1)}, safe_rlhf / "head.bin")
    raw = json.loads((safe_rlhf / "config.json").read_text())
    raw.update(architectures=["LlamaForScore"], score_dim=1)
    (safe_rlhf / "config.json").write_text(json.dumps(raw))
    LlamaForCausalLM(config()).save_pretrained(guard)
    for model in (reward, cost, safe_rlhf, guard):
        tokenizer.save_pretrained(model)
    return JudgeModels(pipeline_root, reward, cost, safe_rlhf, guard)


def _guard(m: JudgeModels, trust: bool) -> object:
    params = GuardParams(model=str(m.guard), format="instruction", prompt=None, severe_categories=["S1"],
                         max_new_tokens=4, batch_size=2, verdict="reply", rate_helpfulness=False,
                         helpfulness_prompt=None)  # fmt: skip
    return GuardJudge(params, trust_remote_code=trust)


def _judging(m: JudgeModels, trust: bool, judge: str) -> object:
    """evaluate's judges as the stage builds them, with evaluate.trust_remote_code as given."""
    params = load_params(m.root / "params.yaml")
    guard = params.evaluate.guard.model_copy(update={"model": str(m.guard), "max_new_tokens": 4})
    e = params.evaluate.model_copy(update={"judge": judge, "reward_model": str(m.reward), "cost_model": str(m.cost),
                                           "guard": guard, "trust_remote_code": trust})  # fmt: skip
    return evaluate.make_judge(params.model_copy(update={"evaluate": e}), m.reward.parent / "judge_cache.sqlite")


def _asked(trust: bool | None) -> dict[str, bool]:
    """The loader's own default (None), or trust_remote_code as given."""
    return {} if trust is None else {"trust_remote_code": trust}


NF4 = QuantizationParams(bits=4, quant_type="nf4", double_quant=True, compute_dtype="float32")
# name -> how to run the loader: trust None leaves its default, True asks for the model's own code
LOADERS: dict[str, Callable[[JudgeModels, bool | None], object]] = {
    "load_causal_lm": lambda m, trust: load_causal_lm(m.root / "models" / "sft", **_asked(trust)),
    "load_tokenizer": lambda m, trust: load_tokenizer(m.root / "data" / "tokenizer", **_asked(trust)),
    "load_aligned_policy": lambda m, trust: load_aligned_policy(
        m.root / "models" / "sft", m.root / "models" / "reward", **_asked(trust)
    ),
    "load_quantized": lambda m, trust: load_quantized(m.root / "models" / "sft", NF4, "cpu", False, **_asked(trust)),
    "ScoreModel-reward": lambda m, trust: ScoreModel(m.reward, "reward", **_asked(trust)),
    "ScoreModel-cost-two-labels": lambda m, trust: ScoreModel(m.cost, "cost", **_asked(trust)),
    "ScoreModel-safe-rlhf": lambda m, trust: ScoreModel(m.safe_rlhf, "cost", **_asked(trust)),
    "GuardJudge": lambda m, trust: _guard(m, bool(trust)),  # no default: the stage always passes the switch
    "make_judge-score_models": lambda m, trust: _judging(m, bool(trust), "score_models"),
    "make_judge-guard": lambda m, trust: _judging(m, bool(trust), "guard"),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_every_loader_says_whether_to_trust_remote_code_and_it_is_off_unless_asked(
    loader: str, judge_models: JudgeModels, hf_loads: list[Load]
) -> None:
    """The real loaders run with transformers' from_pretrained wrapped: each load the package makes
    passes trust_remote_code explicitly (never transformers' default, which may prompt on a
    terminal), False by default (the judges: evaluate.trust_remote_code false) and True only when
    asked. make_judge is the evaluate stage's path from params to the judges' loaders."""
    LOADERS[loader](judge_models, None)
    assert hf_loads, "no load recorded: the test would pass whatever the code does"
    off = {(load.what, load.caller): load.kwargs.get("trust_remote_code", "not passed") for load in hf_loads}
    assert set(off.values()) == {False}, off
    hf_loads.clear()
    LOADERS[loader](judge_models, True)
    on = {(load.what, load.caller): load.kwargs.get("trust_remote_code", "not passed") for load in hf_loads}
    assert set(on) == set(off)
    assert set(on.values()) == {True}, on


def test_a_score_head_in_a_bin_file_is_read_weights_only(
    judge_models: JudgeModels, torch_loads: list[tuple[str, dict[str, Any]]], tmp_path: Path
) -> None:
    """A Safe-RLHF score head shipped as a .bin (a pickle) is read with torch.load(weights_only=True):
    the head loads, and a .bin that carries code is refused without running it."""
    scorer = ScoreModel(judge_models.safe_rlhf, "cost")
    assert tuple(scorer.head.weight.shape) == (1, 16)
    head = str(judge_models.safe_rlhf / "head.bin")
    assert [kwargs.get("weights_only") for f, kwargs in torch_loads if f == head] == [True]
    poisoned, marker = _poisoned_head(judge_models, tmp_path)
    with pytest.raises(PickledCodeError) as refused:
        ScoreModel(poisoned, "cost")
    assert str(refused.value) == _refused(poisoned / "head.bin", HEAD_ADVICE, "evaluate.cost_model")
    assert not marker.exists()


# what the refusal of a pickle that carries code says: the file, what it would call, what to do
HEAD_ADVICE = "convert its tensors to safetensors (only from a source you trust) or name another model"


def _refused(file: Path, advice: str, key: str | None = None) -> str:
    calls = f"{open.__module__}.{open.__qualname__}"  # what RunsCode's pickle calls (io.open)
    return (f"{key + ': ' if key else ''}{file}: refused: it carries code to run when loaded ({calls}), and only "
            f"weights are read (torch.load with weights_only=True); {advice}")  # fmt: skip


def _poisoned_head(judge_models: JudgeModels, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the Safe-RLHF score model whose head.bin carries code (creating a marker file):
    the folder and the marker."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(judge_models.safe_rlhf, poisoned)
    marker = tmp_path / "code-ran"
    torch.save({"score_head.weight": torch.randn(1, 16), "payload": RunsCode(marker)}, poisoned / "head.bin")
    return poisoned, marker


def test_evaluate_with_a_score_head_that_carries_code_is_one_line_and_runs_nothing(
    judge_models: JudgeModels, tmp_path: Path
) -> None:
    """`rsa-pl evaluate` with the score_models judge and a cost model whose .bin head carries code:
    exit 2, one line naming evaluate.cost_model and the file, saying it was refused and what to do,
    before any policy answers; the code did not run and nothing is written."""
    poisoned, marker = _poisoned_head(judge_models, tmp_path)
    root = judge_models.root
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["evaluate"].update(judge="score_models", reward_model=str(judge_models.reward), cost_model=str(poisoned))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    models = tmp_path / "models"
    for name in ("sft", "reward"):
        shutil.copytree(root / "models" / name, models / name)
    shutil.copytree(root / "models" / "sft", models / "safety")
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["evaluate", "--params", str(params), "--data", str(root / "data"),
                                      "--models", str(models), "--out", str(tmp_path / "eval"),
                                      "--checkpoints", str(tmp_path / "ckpt"),
                                      "--judge-cache", str(tmp_path / "judge_cache.sqlite")])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: " + _refused(poisoned / "head.bin", HEAD_ADVICE, "evaluate.cost_model")]
    assert not marker.exists()
    assert sorted(tmp_path.rglob("*")) == before  # no answers, no judge cache, no eval/


def _interrupted(tmp_path: Path, pipeline_root: Path, stage: str) -> Path:
    """A copy of the session's checkpoints of stage as a run killed after its last checkpoint
    leaves them (not marked finished: the next run resumes from last.ckpt)."""
    checkpoints = tmp_path / "ckpt"
    shutil.copytree(pipeline_root / "ckpt" / {"sft": "sft", "train_reward": "reward"}[stage], checkpoints)
    record = json.loads((checkpoints / FINGERPRINT).read_text())
    record.pop("finished", None)
    (checkpoints / FINGERPRINT).write_text(json.dumps(record))
    return checkpoints


def _rerun(stage: str, pipeline_root: Path, tmp_path: Path, checkpoints: Path, console: Console) -> None:
    params, data, models = pipeline_root / "params.yaml", pipeline_root / "data", tmp_path / "models"
    if stage == "sft":
        sft.run(params, data, models / "sft", checkpoints, console, tmp_path / "metrics")
    else:
        shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
        preference.run(stage, params, data, models, checkpoints, console, tmp_path / "metrics")


@pytest.mark.parametrize("stage", ["sft", "train_reward"])
def test_checkpoints_are_resumed_weights_only(
    stage: str, tmp_path: Path, pipeline_root: Path, torch_loads: list[tuple[str, dict[str, Any]]]
) -> None:
    """An interrupted run's checkpoint is resumed (Lightning's restore, which reads it with
    torch.load) with weights_only=True: explicit, not torch's default of the day."""
    checkpoints = _interrupted(tmp_path, pipeline_root, stage)
    console = Console(record=True, width=400)
    _rerun(stage, pipeline_root, tmp_path, checkpoints, console)
    assert f"resuming from {checkpoints / LAST}" in console.export_text()
    assert [kwargs.get("weights_only") for f, kwargs in torch_loads if f == str(checkpoints / LAST)] == [True]


@pytest.mark.parametrize("stage", ["sft", "train_reward"])
def test_a_checkpoint_that_carries_code_is_refused_without_running_it(
    stage: str, tmp_path: Path, pipeline_root: Path
) -> None:
    """An interrupted run's last.ckpt that carries code, resumed by `rsa-pl sft` or a preference
    stage (train-reward; train-safety resumes through the same code): exit 2, one line naming the
    checkpoint, saying it was refused and to delete it to start over; the code did not run, no model
    is written, and the checkpoint is left for the user to look at."""
    checkpoints = _interrupted(tmp_path, pipeline_root, stage)
    marker = tmp_path / "code-ran"
    state = torch.load(checkpoints / LAST, map_location="cpu", weights_only=True)
    torch.save({**state, "payload": RunsCode(marker)}, checkpoints / LAST)
    poisoned = (checkpoints / LAST).read_bytes()
    models, data = tmp_path / "models", str(pipeline_root / "data")
    common = ["--params", str(pipeline_root / "params.yaml"), "--data", data, "--checkpoints", str(checkpoints),
              "--metrics", str(tmp_path / "metrics")]  # fmt: skip
    if stage == "sft":
        args = ["sft", *common, "--out", str(models / "sft")]
    else:
        shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
        args = ["train-reward", *common, "--models", str(models), "--pairs", str(tmp_path / "pairs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    advice = f"delete it (or {checkpoints}) to start the stage over"
    assert errors == ["error: " + _refused(checkpoints / LAST, advice)]
    assert not marker.exists()
    written = sorted(p.name for p in models.iterdir()) if models.exists() else []
    assert written == ([] if stage == "sft" else ["sft"])  # no model, no staging folder left
    assert (checkpoints / LAST).read_bytes() == poisoned


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_no_call_site_leaves_the_safety_keywords_to_a_default() -> None:
    """The one source scan, for call sites no test runs (4-bit loading on CUDA, a hub id): the
    package's calls (ast, not text) of from_pretrained (peft's adapters aside: safetensors only)
    pass trust_remote_code, never a literal True; torch.load and a Trainer's fit with a checkpoint
    pass weights_only=True. The behaviour is checked by running the loaders:
    test_every_loader_says_whether_to_trust_remote_code_and_it_is_off_unless_asked,
    test_a_score_head_in_a_bin_file_is_read_weights_only and test_checkpoints_are_resumed_weights_only."""
    found = {"from_pretrained": 0, "torch.load": 0, "fit": 0}
    problems = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            receiver, attribute = node.func.value, node.func.attr
            if attribute == "from_pretrained":
                if isinstance(receiver, ast.Name) and receiver.id == "PeftModel":
                    continue
                found["from_pretrained"] += 1
                trust = _keyword(node, "trust_remote_code")
                if trust is None or (isinstance(trust, ast.Constant) and trust.value is True):
                    problems.append(f"{where}: from_pretrained without trust_remote_code, or with True")
            elif attribute == "load" and isinstance(receiver, ast.Name) and receiver.id == "torch":
                found["torch.load"] += 1
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            elif attribute == "fit" and _keyword(node, "ckpt_path") is not None:
                found["fit"] += 1
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{where}: fit(ckpt_path=...) without weights_only=True")
    assert not problems
    assert found["from_pretrained"] >= 7  # the scan sees the call sites (models, judges, guard)
    assert found["torch.load"] >= 1  # the score-model judge's .bin heads
    assert found["fit"] == 1  # rsa_pl.training.fit, which sft and the preference stages call


def test_models_are_written_as_safetensors(pipeline_root: Path) -> None:
    files = [f for f in (pipeline_root / "models").rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    pickled = [f for f in files if f.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]
    assert not pickled


def test_no_secret_from_the_environment_reaches_logs_checkpoints_or_outputs(
    tmp_path: Path, pipeline_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hf_SECRETdoNotLeak1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    params = stage_params(tmp_path)
    models = tmp_path / "models"
    shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
    console = Console(record=True)
    preference.run("train_reward", params, pipeline_root / "data", models, tmp_path / "ckpt", console,
                   tmp_path / "metrics" / "train_reward")  # fmt: skip
    assert secret not in console.export_text()
    written = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert any(f.name == "last.ckpt" for f in written)
    assert any(f.name == "curves.jsonl" for f in written)  # the curves' journal, in the checkpoints
    assert any(f.name == "loss_step.tsv" for f in written)  # dvclive's curves
    leaked = [f for f in written if secret.encode() in f.read_bytes()]
    assert not leaked


# A model and a tokenizer whose configs name their own code (auto_map); the code leaves a file
# behind when it runs, so a test sees whether it ran.
CUSTOM_MODEL = """
import os
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
Path(os.environ["RSA_PL_TEST_RAN"]).write_text("model code ran")
class CustomConfig(LlamaConfig):
    model_type = "rsa_pl_custom_test"
class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
"""
CUSTOM_TOKENIZER = """
import os
from pathlib import Path
from transformers import PreTrainedTokenizerFast
Path(os.environ["RSA_PL_TEST_RAN"]).write_text("tokenizer code ran")
class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


def model_with_its_own_code(folder: Path, vocab_size: int = 64) -> Path:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "custom.py").write_text(CUSTOM_MODEL)
    raw = json.loads((folder / "config.json").read_text())
    auto_map = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    raw.update(model_type="rsa_pl_custom_test", architectures=["CustomModel"], auto_map=auto_map)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


def tokenizer_with_its_own_code(folder: Path) -> Path:
    words = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(folder)
    (folder / "custom_tok.py").write_text(CUSTOM_TOKENIZER)
    raw = json.loads((folder / "tokenizer_config.json").read_text())
    raw.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "custom_tok.CustomTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(raw))
    return folder


@pytest.fixture
def ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    marker = tmp_path / "ran"
    monkeypatch.setenv("RSA_PL_TEST_RAN", str(marker))
    return marker


def test_a_model_or_tokenizer_with_its_own_code_is_refused_unless_params_allow_it(tmp_path: Path, ran: Path) -> None:
    model = model_with_its_own_code(tmp_path / "model")
    with pytest.raises(RemoteCodeError, match=r"set sft\.model\.trust_remote_code: true only if you trust"):
        load_causal_lm(model)
    with pytest.raises(RemoteCodeError, match=r"set evaluate\.trust_remote_code: true"):
        ScoreModel(model)
    tokenizer = tokenizer_with_its_own_code(tmp_path / "tokenizer")
    with pytest.raises(RemoteCodeError, match=r"set prepare\.tokenizer\.trust_remote_code: true"):
        load_tokenizer(tokenizer)
    assert not ran.exists()  # refused before any of its code ran
    assert type(load_causal_lm(model, trust_remote_code=True)).__name__ == "CustomModel"
    assert ran.read_text() == "model code ran"
    assert type(load_tokenizer(tokenizer, trust_remote_code=True)).__name__ == "CustomTokenizer"
    assert ran.read_text() == "tokenizer code ran"


def test_a_pretrained_base_with_its_own_code_follows_the_params_switch_in_later_stages(
    tmp_path: Path, pipeline_root: Path, ran: Path
) -> None:
    """sft loads the base only with the switch on (one line when off), and records it with the saved
    copy; train-reward then runs the copy's code by that record."""
    params = stage_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    model = model_with_its_own_code(tmp_path / "base", vocab_size=2048)  # the world's tokenizer fits in it
    raw["sft"]["model"].update(kind="pretrained", name_or_path=str(model))
    params.write_text(yaml.safe_dump(raw))
    models, data = tmp_path / "models", str(pipeline_root / "data")
    runner = CliRunner()
    sft = ["sft", "--params", str(params), "--data", data, "--out", str(models / "sft"),
           "--checkpoints", str(tmp_path / "ck-sft"), "--metrics", str(tmp_path / "m.json")]  # fmt: skip
    refused = runner.invoke(app, sft)
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        f"error: {model}: it ships its own code to run (auto_map in its config), which is off; "
        "set sft.model.trust_remote_code: true only if you trust that code"
    ]
    assert not ran.exists()
    assert not (models / "sft").exists()
    raw["sft"]["model"]["trust_remote_code"] = True
    params.write_text(yaml.safe_dump(raw))
    saved = runner.invoke(app, sft)
    assert saved.exit_code == 0, saved.output
    assert ran.exists()
    assert json.loads((models / "sft" / BASE_RECORD).read_text())["trust_remote_code"] is True
    assert trusts_code(models)
    ran.unlink()
    assert type(preference._starting_policy(models, None)).__name__ == "CustomModel"  # the saved copy's code
    assert ran.exists()


# Runs in a child process with the network cut at the socket layer and every attempt logged
# (a test process cannot undo the HF_HUB_OFFLINE=1 that conftest set at import).
GUARDED = """
import socket, sys
log = sys.argv[1]
def refuse(*args, **kwargs):
    with open(log, "a") as file:
        file.write(repr(args)[:300] + "\\n")
    raise OSError(101, "Network is unreachable (cut by the test)")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
sys.argv = ["rsa-pl", *sys.argv[2:]]
from rsa_pl.pipeline.cli import app
app()
"""


def guarded(tmp_path: Path, log: Path, offline: bool, *command: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(script), str(log), *command], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
def test_nothing_reaches_the_network_unless_params_name_a_hub_id(tmp_path: Path) -> None:
    """Online mode (no *_OFFLINE variable), the network cut and watched: the whole pipeline on
    local data makes no connection attempt at all. A hub id in params is the one thing that
    tries (so the watch works), and with HF_HUB_OFFLINE=1 even that does not: one line instead."""
    params = stage_params(tmp_path)
    raw = yaml.safe_load(params.read_text())
    raw["merge"]["q"] = [0.5]
    raw["evaluate"].update(samples_per_prompt=1, max_new_tokens=4)
    params.write_text(yaml.safe_dump(raw))
    log, data, models = tmp_path / "connections.log", str(tmp_path / "data"), tmp_path / "models"
    ck, m = tmp_path / "checkpoints", tmp_path / "metrics"
    stages = [
        ["prepare", "--out", data],
        ["sft", "--data", data, "--out", str(models / "sft"), "--checkpoints", str(ck / "sft"),
         "--metrics", str(m / "sft.json")],
        *([stage, "--data", data, "--models", str(models), "--checkpoints", str(ck / stage),
           "--metrics", str(m / f"{stage}.json")] for stage in ("train-reward", "train-safety")),
        ["merge", "--models", str(models), "--out", str(models / "merged")],
        ["evaluate", "--data", data, "--models", str(models), "--out", str(tmp_path / "eval"),
         "--checkpoints", str(ck / "evaluate")],
    ]  # fmt: skip
    for stage in stages:
        done = guarded(tmp_path, log, False, stage[0], "--params", str(params), *stage[1:])
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "eval" / "metrics.json").exists()
    assert not log.exists(), log.read_text()

    hub = tmp_path / "hub.yaml"
    raw["sft"]["model"].update(kind="pretrained", name_or_path="rsa-pl-test/no-such-model")
    hub.write_text(yaml.safe_dump(raw))
    hub_sft = ["sft", "--params", str(hub), "--data", data, "--out", str(tmp_path / "hub-models" / "sft"),
               "--checkpoints", str(ck / "hub-sft"), "--metrics", str(m / "hub.json")]  # fmt: skip
    offline = guarded(tmp_path, log, True, *hub_sft)
    assert offline.returncode == 2
    lines = [line for line in offline.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, offline.stderr[-2000:]
    assert lines[0].startswith("error: rsa-pl-test/no-such-model: cannot load the model (")
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in lines[0]
    assert not log.exists()  # offline mode honoured: not even a lookup

    online = guarded(tmp_path, log, False, *hub_sft)
    assert online.returncode == 2
    lines = [line for line in online.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, online.stderr[-2000:]
    assert lines[0].startswith("error: rsa-pl-test/no-such-model: cannot load the model (")
    assert log.exists()  # the hub id was looked up: the guard sees real attempts
