"""The sft stage: a tiny model from a config trains, saves in HF format, resumes only when compatible."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from rsa_pl.config import ModelParams
from rsa_pl.data.collate import PreferenceCollator, SFTCollator
from rsa_pl.data.tokenize import IGNORE_INDEX
from rsa_pl.models import build_scratch_model, load_tokenizer
from rsa_pl.modules import warmup_cosine
from rsa_pl.pipeline import prepare, sft
from rsa_pl.pipeline.cli import app
from rsa_pl.training import resumable_checkpoint
from tests import live
from tests.helpers import ROOT, scratch_model_params, tiny_params

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prepared")
    params = tiny_params(root)
    prepare.run(params, root / "data", QUIET)
    return params, root / "data"


def test_collators_pad_and_concatenate() -> None:
    batch = SFTCollator(pad_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, IGNORE_INDEX, IGNORE_INDEX]]

    def pair(chosen: list[int], rejected: list[int]) -> dict[str, list[int]]:
        return {"chosen_input_ids": chosen, "chosen_labels": [-100, *chosen[1:]],
                "rejected_input_ids": rejected, "rejected_labels": [-100, *rejected[1:]]}  # fmt: skip

    pairs = [pair([1, 2, 3], [1, 4]), pair([1, 5], [1, 6, 7, 8])]
    batch = PreferenceCollator(pad_id=0)(pairs)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 5, 0, 0], [1, 4, 0, 0], [1, 6, 7, 8]]
    assert batch["labels"][:, 0].tolist() == [IGNORE_INDEX] * 4


def test_warmup_cosine_schedule() -> None:
    values = [warmup_cosine(s, 4, 20) for s in range(21)]
    assert values[0] == pytest.approx(0.2)
    assert values[3] == pytest.approx(0.8)
    assert max(values) == pytest.approx(1.0)
    assert values[20] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in pairwise(values[4:]))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_scratch_models_build_from_configs(prepared: tuple[Path, Path], architecture: str) -> None:
    _, data = prepared
    tokenizer = AutoTokenizer.from_pretrained(str(data / "tokenizer"))
    model = build_scratch_model(scratch_model_params(architecture, 128), tokenizer)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, len(tokenizer))
    assert model.config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_sft_trains_and_saves_a_loadable_model(tmp_path: Path, prepared: tuple[Path, Path], architecture: str) -> None:
    _, data = prepared
    params = tiny_params(tmp_path, architecture)
    metrics = sft.run(params, data, tmp_path / "models" / "sft", tmp_path / "ckpt", QUIET, tmp_path / "m")
    out = tmp_path / "models" / "sft"
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert model.config.model_type == architecture
    assert len(tokenizer) == model.config.vocab_size
    saved = json.loads((out / "metrics.json").read_text())
    logged = live.summary(tmp_path / "m")  # dvclive's summary: the final metrics and each curve's last value
    assert {k: logged[k] for k in metrics} == metrics
    # the model folder holds no wall-clock figures (a rerun of the same model is the same bytes)
    assert saved == {k: v for k, v in metrics.items() if k != "time/train_s"}
    assert metrics["time/train_s"] > 0
    assert metrics["train/steps"] == 6
    for key in ("val/loss", "sample/parse_rate", "sample/redteam_unsafe_rate", "sample/helpful_needless_refusal_rate"):
        assert key in metrics
    assert {"train/loss_step", "val/loss", "train/tokens_per_s", "train/lr"} <= set(live.curves(tmp_path / "m"))
    assert [step for step, _ in live.curve(tmp_path / "m", "train/loss_step")] == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]  # every step (log_every_n_steps 1)
    assert not (out / "curves.csv").exists()  # the curves are dvclive's, in the metrics folder only
    assert (tmp_path / "ckpt" / "last.ckpt").exists()


def test_sft_loss_falls(tmp_path: Path, prepared: tuple[Path, Path]) -> None:
    _, data = prepared
    params = tiny_params(tmp_path, max_steps=80, lr=1e-2)
    sft.run(params, data, tmp_path / "out", tmp_path / "ckpt", QUIET)
    losses = [loss for _, loss in live.curve(tmp_path / "ckpt" / "live", "train/loss_step")]  # the default folder
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_checkpoints_resume_only_with_the_same_identity(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    assert resumable_checkpoint(folder, {"lr": 1})[0] is None
    (folder / "last.ckpt").write_text("weights")
    path, note = resumable_checkpoint(folder, {"lr": 1})
    assert path == folder / "last.ckpt"
    assert note.startswith("resuming")
    path, note = resumable_checkpoint(folder, {"lr": 2})
    assert path is None
    assert "other params" in note
    assert not (folder / "last.ckpt").exists()


def test_an_interrupted_run_resumes_and_a_finished_one_does_not(tmp_path: Path, prepared: tuple[Path, Path]) -> None:
    _, data = prepared
    params = tiny_params(tmp_path)
    sft.run(params, data, tmp_path / "a", tmp_path / "ckpt", QUIET)
    console = Console(record=True, width=200)
    sft.run(params, data, tmp_path / "b", tmp_path / "ckpt", console)
    assert "the run there had finished" in console.export_text()
    marker = json.loads((tmp_path / "ckpt" / "fingerprint.json").read_text())
    (tmp_path / "ckpt" / "fingerprint.json").write_text(json.dumps({**marker, "finished": False}))  # as if killed
    console = Console(record=True, width=200)
    again = sft.run(params, data, tmp_path / "c", tmp_path / "ckpt", console)
    assert "resuming from" in console.export_text()
    assert again["train/steps"] == 6


def test_cli_sft_says_what_to_run_first(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sft", "--data", str(tmp_path / "data")])
    assert result.exit_code == 2
    assert "run `rsa-pl prepare` first" in result.output
    assert len(result.output.strip().splitlines()) == 1


def pretrained_base(folder: Path, tokenizer_folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny 'pretrained' Llama saved as a user's model folder would be (its own dtype)."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    shape = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32, "max_positions": 256}
    params = ModelParams(
        kind="scratch", name_or_path=None, gguf_file=None, trust_remote_code=False, architecture="llama", **shape
    )
    build_scratch_model(params, tokenizer).to(dtype).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_a_pretrained_base_is_saved_as_is_with_the_prepared_tokenizer(tmp_path: Path,
                                                                      prepared: tuple[Path, Path]) -> None:  # fmt: skip
    """models/sft gets the base's exact weights in their own dtype (bf16 stays bf16), the tokenizer
    prepare used, base_model.json, metrics and an empty curve; checkpoints/sft exists (DVC declares it)."""
    _, embedded = prepared
    base = pretrained_base(tmp_path / "base", embedded / "tokenizer")
    raw = yaml.safe_load(tiny_params(tmp_path).read_text())
    raw["sft"]["model"].update(kind="pretrained", name_or_path=str(base))
    raw["prepare"]["tokenizer"].update(kind="pretrained", name_or_path=str(base), vocab_size=None)
    raw["prepare"]["source"].update(
        kind="pku_saferlhf", path=str(ROOT / "tests" / "data" / "pku_saferlhf_sample.jsonl")
    )
    raw["prepare"].update(max_prompt_length=200, max_length=400)
    raw["evaluate"].update(judge="score_models", reward_model="rm", cost_model="cm")
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    data = tmp_path / "data"
    prepare.run(path, data, QUIET)
    assert not (data / "sft").exists()  # a real source has no SFT set: the base is used as it is
    metrics = sft.run(path, data, tmp_path / "out", tmp_path / "ckpt", QUIET, tmp_path / "metrics" / "sft")
    out = tmp_path / "out"
    assert json.loads((out / "base_model.json").read_text()) == {
        "source": str(base), "gguf_file": None, "revision": None, "dtype": "bfloat16", "trust_remote_code": False,
    }  # fmt: skip
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    original = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    assert saved.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(saved.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (
        AutoTokenizer.from_pretrained(str(out)).get_vocab()
        == AutoTokenizer.from_pretrained(str(data / "tokenizer")).get_vocab()
    )
    assert metrics["train/steps"] == 0
    assert metrics["base/parameters"] == sum(p.numel() for p in original.parameters())
    assert live.summary(tmp_path / "metrics" / "sft") == metrics
    assert live.curve(tmp_path / "metrics" / "sft", "train/loss_step") == []  # declared in dvc.yaml, empty
    assert not (tmp_path / "ckpt").exists()  # nothing trained, nothing to resume


def test_a_log_gets_progress_lines_when_stderr_is_not_a_terminal(
    tmp_path: Path, prepared: tuple[Path, Path], capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under pytest stderr is a pipe, as under `dvc repro > log`: each step (interval 0 s here) says
    step/total, share, loss, tokens/s and the time left."""
    monkeypatch.setenv("RSA_PL_PROGRESS_S", "0")
    _, data = prepared
    sft.run(tiny_params(tmp_path, max_steps=3), data, tmp_path / "out", tmp_path / "ckpt", QUIET)
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("sft: step")]
    assert len(lines) == 3, lines
    for step, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"sft: step {step}/3 \(\d+%\), loss \d+\.\d{{4}}, [\d,]+ tokens/s, ETA \d+:\d\d:\d\d",
                            line), line  # fmt: skip


def test_a_saved_tokenizer_does_not_record_the_hub_being_offline(tmp_path: Path, prepared: tuple[Path, Path]) -> None:
    """transformers keeps local_files_only (true under HF_HUB_OFFLINE) among the kwargs it saves:
    a stage's output would then differ with the environment it ran in, and DVC rerun what follows."""
    _, data = prepared
    tokenizer = load_tokenizer(data / "tokenizer")
    tokenizer.save_pretrained(str(tmp_path / "saved"))
    assert "local_files_only" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
