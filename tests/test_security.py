"""Safe loading: no pickle for models or checkpoints, no remote code, only what params name."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from rsa_pl.errors import RemoteCodeError
from rsa_pl.evaluation.judges import ScoreModel
from rsa_pl.models import load_causal_lm, load_tokenizer
from rsa_pl.pipeline import preference
from rsa_pl.pipeline.artifacts import BASE_RECORD, trusts_code
from rsa_pl.pipeline.cli import app
from tests.test_preference import stage_params

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(ROOT.glob("rsa_pl/**/*.py"))


def calls(name: str) -> list[tuple[Path, str]]:
    """Every call of `name(` in the package's sources, with what it is called on (a dotted
    name before it) and its arguments (up to the closing paren)."""
    found = []
    for path in SOURCES:
        text = path.read_text()
        for match in re.finditer(r"[\w.]*" + re.escape(name) + r"\(", text):
            depth, end = 1, match.end()
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            found.append((path, text[match.start() : end]))
    return found


def test_no_remote_code_is_ever_trusted_by_the_code_itself() -> None:
    for path in SOURCES:
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text()), path


def test_every_transformers_load_says_whether_to_trust_remote_code() -> None:
    """Explicit everywhere: never transformers' default (which may prompt on a terminal)."""
    loads = [(p, c) for p, c in calls(".from_pretrained") if "PeftModel.from_pretrained" not in c]
    assert len(loads) >= 7
    for path, call in loads:
        assert "trust_remote_code=" in call, f"{path}: {call}"


def test_every_torch_load_is_weights_only() -> None:
    loads = calls("torch.load")
    assert loads  # the score-model judge reads .bin heads
    for path, call in loads:
        assert "weights_only=True" in call, f"{path}: {call}"


def test_checkpoints_are_resumed_weights_only() -> None:
    fits = calls("trainer.fit")
    assert len(fits) == 2  # sft and the preference stages
    for path, call in fits:
        assert "weights_only=True" in call, f"{path}: {call}"


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
