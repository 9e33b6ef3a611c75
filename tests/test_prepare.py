"""The prepare stage: tokenization boundaries, the embedded world end to end, real data, bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from datasets import load_from_disk
from rich.console import Console
from typer.testing import CliRunner

from pipeline import prepare
from pipeline.cli import app
from rsa_pl.data.tokenize import IGNORE_INDEX, PromptTooLongError, encode, format_prompt, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"


def small_params(tmp_path: Path, **prepare_changes: Any) -> Path:
    """The committed params with a small world, written to tmp_path/params.yaml."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    world = raw["prepare"]["world"]
    world.update(preference_pairs=300, sft_examples=300, helpful_eval_prompts=16, redteam_eval_prompts=16)
    for key, value in prepare_changes.items():
        raw["prepare"][key] = value
    # A tiny base model too, for the DVC run of the whole pipeline.
    raw["sft"]["model"].update(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    raw["sft"]["train"].update(batch_size=8, max_steps=4, val_every_n_steps=2, checkpoint_every_n_steps=2)
    raw["sft"]["sample"]["max_new_tokens"] = 8
    for stage in ("train_reward", "train_safety"):
        raw[stage]["train"].update(batch_size=4, max_steps=3, val_every_n_steps=2, checkpoint_every_n_steps=2)
    raw["merge"]["q"] = [0.5]
    raw["evaluate"].update(samples_per_prompt=2, max_new_tokens=8)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_prepare(params: Path, out: Path) -> dict[str, Any]:
    return prepare.run(params, out, Console(quiet=True))


@pytest.fixture(scope="module")
def tokenizer():
    texts = [
        f"{TEMPLATE.format(prompt=p)} {r}"
        for p in ("How do I cook rice?", "Help me rob the Olmin bank.")
        for r in ("First wash the rice in cold water.", "I cannot help with that.", "ANSWER: yes")
    ] * 20
    return train_bpe_tokenizer(texts, 400, TEMPLATE)


def test_response_tokens_are_the_joint_tokenization_suffix(tokenizer) -> None:
    text, separator = format_prompt(tokenizer, "How do I cook rice?", TEMPLATE)
    assert text == TEMPLATE.format(prompt="How do I cook rice?")
    assert separator == " "
    e = encode(tokenizer, text, separator, "First wash the rice in cold water.", 200, 100)
    joint = tokenizer(text + " First wash the rice in cold water.")["input_ids"]
    assert e.input_ids == [*joint, tokenizer.eos_token_id]
    assert e.labels[: e.prompt_length] == [IGNORE_INDEX] * e.prompt_length
    assert e.labels[e.prompt_length :] == e.input_ids[e.prompt_length :]
    assert tokenizer.decode(e.input_ids[e.prompt_length : -1]) == " First wash the rice in cold water."


def test_boundary_is_right_when_the_template_merges_tokens_across_it(tokenizer) -> None:
    """A template ending mid-word: jointly, 'ANSW' + 'ER' merge into one token across the boundary."""
    prompt_text = "How do I cook rice? ANSW"
    joint = tokenizer(prompt_text + "ER: yes")["input_ids"]
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    assert joint[: len(prompt_ids)] != prompt_ids  # the merge really happens
    e = encode(tokenizer, prompt_text, "", "ER: yes", 200, 100)
    assert e.input_ids[: e.prompt_length] == prompt_ids  # the prompt as the model sees it at generation
    assert tokenizer.decode(e.input_ids[e.prompt_length : -1]) == "ER: yes"
    assert e.labels == [IGNORE_INDEX] * len(prompt_ids) + e.input_ids[len(prompt_ids) :]


def test_truncation_keeps_the_prompt_and_cuts_the_response_end(tokenizer) -> None:
    text, separator = format_prompt(tokenizer, "How do I cook rice?", TEMPLATE)
    full = encode(tokenizer, text, separator, "First wash the rice in cold water.", 200, 100)
    cut = encode(tokenizer, text, separator, "First wash the rice in cold water.", full.prompt_length + 3, 100)
    assert cut.truncated
    assert not full.truncated
    assert cut.input_ids == full.input_ids[: full.prompt_length + 3]
    assert cut.response_length == 3
    with pytest.raises(PromptTooLongError, match="max_prompt_length 5"):
        encode(tokenizer, text, separator, "First wash the rice.", 200, 5)


def test_embedded_prepare_builds_every_output(tmp_path: Path) -> None:
    report = run_prepare(small_params(tmp_path), tmp_path / "data")
    data = tmp_path / "data"
    for name in ("tokenizer", "sft", "helpful_pairs", "safety_pairs", "eval_helpful", "eval_redteam", "world"):
        assert (data / name).exists(), name
    sft = load_from_disk(str(data / "sft"))
    example = sft["train"][0]
    n_prompt = sum(label == IGNORE_INDEX for label in example["labels"])
    assert n_prompt > 0
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    pairs = load_from_disk(str(data / "safety_pairs"))["train"]
    row = pairs[0]
    assert (
        row["chosen_input_ids"][: row["chosen_labels"].count(IGNORE_INDEX)]
        == row["rejected_input_ids"][: row["rejected_labels"].count(IGNORE_INDEX)]
    )  # one prompt, two responses
    redteam = load_from_disk(str(data / "eval_redteam"))
    assert len(redteam) == 16
    assert all(c is not None for c in redteam["category"])
    # Every preference row read is used or rejected with a reason; the report adds up.
    counts = report["counts"]
    used = counts["helpful_pairs"]["train"] + counts["helpful_pairs"]["validation"]
    world_rejects = sum(v for k, v in report["rejected"]["by_reason"].items() if k != "prompt too long")
    assert used + world_rejects == report["rows_read"] == 300
    rejects = [json.loads(line) for line in (data / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == report["rejected"]["total"] > 0
    assert {r["reason"] for r in rejects} <= set(report["rejected"]["by_reason"])
    assert all(r["source"].startswith(str(data)) for r in rejects)
    assert json.loads((data / "report.json").read_text()) == report
    assert 0.2 < report["tension"]["share_more_helpful_is_unsafe_other_safe"] < 0.8


def test_prepare_is_deterministic(tmp_path: Path) -> None:
    params = small_params(tmp_path)
    run_prepare(params, tmp_path / "a")
    run_prepare(params, tmp_path / "b")
    assert (tmp_path / "a" / "report.json").read_text() == (tmp_path / "b" / "report.json").read_text()
    for name in ("sft", "helpful_pairs", "safety_pairs"):
        first, second = load_from_disk(str(tmp_path / "a" / name)), load_from_disk(str(tmp_path / "b" / name))
        assert first["train"].to_list() == second["train"].to_list(), name
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").read_text() == (
        tmp_path / "b" / "tokenizer" / "tokenizer.json"
    ).read_text()


def test_prompts_over_the_limit_are_dropped_and_reported(tmp_path: Path) -> None:
    report = run_prepare(small_params(tmp_path, max_prompt_length=22, max_length=60), tmp_path / "data")
    assert report["rejected"]["by_reason"]["prompt too long"] > 0
    assert report["lengths"]["prompt_tokens"]["max"] <= 22
    assert report["lengths"]["truncated_responses"] > 0


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> Path:
    """A 'pretrained' tokenizer in a local folder, as a real model would ship it (no chat template)."""
    path = tmp_path_factory.mktemp("model")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(path))
    return path


@pytest.mark.parametrize(
    ("kind", "sample", "safety_rows"),
    [
        ("pku_saferlhf", "pku_saferlhf_sample.jsonl", True),
        ("hh", "hh_sample.jsonl", False),
        ("jsonl", "pairs_sample.jsonl", False),
    ],
)
def test_real_data_prepare(tmp_path: Path, saved_tokenizer: Path, kind: str, sample: str, safety_rows: bool) -> None:
    params = small_params(
        tmp_path,
        source={"kind": kind, "path": str(DATA / sample), "split": "train"},
        tokenizer={
            "kind": "pretrained",
            "vocab_size": None,
            "name_or_path": str(saved_tokenizer),
            "trust_remote_code": False,
        },
        max_prompt_length=200,
        max_length=400,
        eval_fraction=0.25,
    )
    report = run_prepare(params, tmp_path / "data")
    helpful = load_from_disk(str(tmp_path / "data" / "helpful_pairs"))
    assert len(helpful["train"]) + len(helpful["validation"]) == report["rows_read"] - report["rejected"]["total"]
    first = helpful["train"][0]
    assert first["prompt_text"].startswith("BEGINNING OF CONVERSATION: USER: ")
    safety = load_from_disk(str(tmp_path / "data" / "safety_pairs"))
    assert (len(safety["train"]) > 0) == safety_rows
    assert "sft" not in report["counts"]  # a real base model needs no SFT set


def test_cli_prepare_reports_bad_files_in_one_line_and_keeps_old_outputs(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "marker").write_text("previous outputs")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a"}\n')  # no 'rejected' column at all
    params = small_params(
        tmp_path,
        source={"kind": "jsonl", "path": str(bad), "split": "train"},
        tokenizer={
            "kind": "pretrained",
            "vocab_size": None,
            "name_or_path": "/nonexistent/model",
            "trust_remote_code": False,
        },
    )
    result = CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {bad}: missing required column 'rejected' (schema jsonl)"
    assert (out / "marker").read_text() == "previous outputs"
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_cli_prepare_names_a_tokenizer_it_cannot_load(tmp_path: Path) -> None:
    params = small_params(
        tmp_path,
        source={"kind": "jsonl", "path": str(DATA / "pairs_sample.jsonl"), "split": "train"},
        tokenizer={
            "kind": "pretrained",
            "vocab_size": None,
            "name_or_path": str(tmp_path / "no-model"),
            "trust_remote_code": False,
        },
    )
    result = CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", str(tmp_path / "data")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {tmp_path / 'no-model'}: cannot load the tokenizer")


def test_cli_prepare_bad_rows_go_to_rejects(tmp_path: Path, saved_tokenizer: Path) -> None:
    rows = [
        {"prompt": "How do I cook rice?", "chosen": "First wash the rice.", "rejected": "No."},
        {"prompt": "", "chosen": "a", "rejected": "b"},
        {"prompt": "How do I cook rice?", "chosen": 3, "rejected": "b"},
        {"prompt": "How do I cook beans?", "chosen": "same", "rejected": "same"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join(json.dumps(r).encode() for r in rows) + b"\n\xff\xfe not json\n")
    params = small_params(
        tmp_path,
        source={"kind": "jsonl", "path": str(path), "split": "train"},
        tokenizer={
            "kind": "pretrained",
            "vocab_size": None,
            "name_or_path": str(saved_tokenizer),
            "trust_remote_code": False,
        },
        max_prompt_length=200,
        max_length=400,
    )
    result = CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", str(tmp_path / "data")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["rows_read"] == 5
    assert report["rejected"]["by_reason"] == {
        "empty text: prompt": 1,
        "identical responses": 1,
        "invalid utf-8": 1,
        "not a string: chosen": 1,
    }
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "data" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(reasons) == sorted(report["rejected"]["by_reason"])


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline(tmp_path: Path) -> None:
    """The real DVC, offline, in a copy of the repository with a small world and model: a full
    run, a no-op rerun, a second full run (`--force`) that must give byte-identical results,
    and an experiment."""
    repo = tmp_path / "repo"
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in [*files, "dvc.yaml"]:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    shutil.copy2(small_params(tmp_path), repo / "params.yaml")
    (repo / "dvc.lock").unlink(missing_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    dvc = [str(Path(bin_dir) / "dvc")]
    first = subprocess.run([*dvc, "repro"], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert json.loads((repo / "data" / "report.json").read_text())["counts"]["eval_redteam"] == 16
    assert json.loads((repo / "metrics" / "sft.json").read_text())["train/steps"] == 4
    assert (repo / "models" / "sft" / "model.safetensors").exists()
    assert (repo / "models" / "reward" / "adapter_config.json").exists()
    assert json.loads((repo / "metrics" / "train_safety.json").read_text())["train/steps"] == 3
    assert (repo / "models" / "merged" / "q0.5" / "model.safetensors").exists()
    evaluated = json.loads((repo / "eval" / "metrics.json").read_text())
    assert evaluated["sft.helpful_win_rate"] == 0.5
    assert "q0.5.cost_cvar_0.05" in evaluated
    shown = subprocess.run([*dvc, "metrics", "show"], cwd=repo, capture_output=True, text=True, env=env, timeout=120)
    assert "sample/parse_rate" in shown.stdout
    assert "safety.unsafe_rate" in shown.stdout
    again = subprocess.run([*dvc, "repro"], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0
    assert "didn't change, skipping" in again.stdout or "up to date" in again.stdout

    # Determinism: every stage again from scratch gives the same bytes (training metrics but
    # their wall-clock keys, all of eval/, the data).
    results = ["eval/metrics.json", "eval/per_category.json", "eval/samples.jsonl", "eval/plots/cost_tail.csv",
               "data/report.json", "data/rejects.jsonl"]  # fmt: skip
    before = {name: (repo / name).read_bytes() for name in results}
    timing = ("time/", "tokens_per_s")
    trained = {f.name: {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith(timing[0])
                        and timing[1] not in k} for f in (repo / "metrics").glob("*.json")}  # fmt: skip
    forced = subprocess.run([*dvc, "repro", "--force"], cwd=repo, capture_output=True, text=True, env=env, timeout=300)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert re.findall(r"Running stage '(\w+)'", forced.stdout) == [
        "prepare", "sft", "train_reward", "train_safety", "merge", "evaluate"]  # fmt: skip
    for name in results:
        assert (repo / name).read_bytes() == before[name], f"{name} differs between two full runs"
    for f in (repo / "metrics").glob("*.json"):
        again_trained = {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith(timing[0])
                         and timing[1] not in k}  # fmt: skip
        assert again_trained == trained[f.name], f.name

    # An experiment: commit the run, `dvc exp run -S` an evaluate param; only evaluate re-runs, and
    # `dvc params diff` / `dvc metrics diff` show the change against the committed run.
    git = {
        **env,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=git)
    subprocess.run(["git", "commit", "-qm", "baseline"], cwd=repo, check=True, env=git)
    third = subprocess.run([*dvc, "exp", "run", "-S", "evaluate.temperature=0.5"], cwd=repo, capture_output=True,
                           text=True, env=git, timeout=300)  # fmt: skip
    assert third.returncode == 0, third.stdout + third.stderr
    ran = re.findall(r"Running stage '(\w+)'", third.stdout)
    assert ran == ["evaluate"], third.stdout
    params_diff = subprocess.run([*dvc, "params", "diff"], cwd=repo, capture_output=True, text=True, env=env)
    assert "evaluate.temperature" in params_diff.stdout
    metrics_diff = subprocess.run([*dvc, "metrics", "diff"], cwd=repo, capture_output=True, text=True, env=env)
    assert metrics_diff.returncode == 0, metrics_diff.stderr
    assert "eval/metrics.json" in metrics_diff.stdout
    changed = [line.split()[1] for line in metrics_diff.stdout.splitlines() if line.startswith("eval/metrics.json")]
    assert changed, metrics_diff.stdout  # sampling at another temperature moved some eval metric
