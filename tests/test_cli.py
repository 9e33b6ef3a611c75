"""The `rsa-pl` console script: only working commands, clear one-line errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import Result
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from rsa_pl.models import attach_lora, load_causal_lm, load_tokenizer
from rsa_pl.params_file import load_params
from rsa_pl.pipeline.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_the_working_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("check-params", "prepare", "sft", "train-reward", "train-safety", "merge", "evaluate"):
        assert f" {command} " in result.output, command


def test_check_params_accepts_the_committed_file() -> None:
    result = runner.invoke(app, ["check-params", "--params", str(ROOT / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "is valid" in result.output
    assert "train_safety" in result.output


def test_check_params_reports_every_problem_and_fails(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text()
    bad = tmp_path / "params.yaml"
    bad.write_text(text.replace("mu: 0.95", "mu: 1.5", 1).replace("beta: 0.05", "betta: 0.05"))
    result = runner.invoke(app, ["check-params", "--params", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert f"error: {bad}: train_reward.risk.mu: must be in (0, 1] for cvar, got 1.5" in lines
    assert f"error: {bad}: train_safety.betta: unknown key; did you mean 'beta'?" in lines
    assert f"error: {bad}: train_safety.beta: missing (every key is required; params have no hidden defaults)" in lines


def test_check_params_names_a_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check-params", "--params", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "absent.yaml: file not found" in result.output


def test_console_script_is_installed() -> None:
    script = shutil.which("rsa-pl", path=str(Path(sys.executable).parent))
    assert script is not None, "rsa-pl is not installed next to this Python (pip install -e .)"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("rsa-pl ")


HEAVY = ("torch", "lightning", "transformers", "peft", "bitsandbytes", "datasets")


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sft", "--help"], ["evaluate", "--help"]])
def test_help_and_version_import_no_ml_stack(args: list[str]) -> None:
    """The stages import their stack when they run, so `rsa-pl --help` answers in a fraction of a
    second instead of the ~8 s that torch, lightning, transformers and peft take to import."""
    code = (
        "import sys\n"
        "from rsa_pl.pipeline.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as done:\n    assert done.code in (0, None), done.code\n"
        f"print('loaded:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "loaded: []"


# --- merge: policies that do not fit together, and a bad q, through the merge command ----------


def _merge(params: Path, models: Path, out: Path) -> Result:
    return runner.invoke(app, ["merge", "--params", str(params), "--models", str(models), "--out", str(out)])


def _one_error_line(result: Result) -> str:
    """The one error line of a refused command (exit 2, no traceback; transformers' progress bars
    may come before it)."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an uncaught error
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def _other_base(pipeline_root: Path, hidden_size: int = 16) -> LlamaForCausalLM:
    """A Llama of another width than the session's sft model, with the same vocabulary."""
    tokenizer = load_tokenizer(pipeline_root / "data" / "tokenizer")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=1, num_attention_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config)


def _stage2(kind: str, models: Path, pipeline_root: Path) -> str:
    """Writes a stage-2 (or stage-1) folder that does not fit the others; returns what the
    one-line error must name."""
    lora = load_params(pipeline_root / "params.yaml").train_safety.lora
    tokenizer = load_tokenizer(pipeline_root / "data" / "tokenizer")
    safety = models / "safety"
    if kind == "full-weights-of-other-shapes":
        _other_base(pipeline_root).save_pretrained(safety)
        tokenizer.save_pretrained(safety)
        return r"model\.embed_tokens\.weight: shape \(\d+, 32\) in the stage-1 policy, \(\d+, 16\) in stage 2"
    if kind == "full-weights-of-another-architecture":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)
        GPT2LMHeadModel(config).save_pretrained(safety)
        tokenizer.save_pretrained(safety)
        only = r"\(only in the stage-1 policy: model\..*; only in the stage-2 policy: transformer\."
        return r"the policies have different parameters " + only
    if kind == "adapter-of-another-base":
        shutil.copytree(pipeline_root / "models" / "sft", safety)  # the weights beside it are not read
        attach_lora(_other_base(pipeline_root), lora).save_pretrained(safety / "adapter")
        return re.escape(f"{safety / 'adapter'}: this adapter was not made on the stage-1 policy (size mismatch for ")
    if kind == "adapter-of-other-modules":
        shutil.copytree(pipeline_root / "models" / "sft", safety)
        gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
        attach_lora(gpt2, lora.model_copy(update={"target_modules": ["c_attn"]})).save_pretrained(safety / "adapter")
        return re.escape(f"{safety / 'adapter'}: this adapter was not made on the stage-1 policy (") + ".*c_attn"
    if kind == "stage-1-adapter-of-another-base":
        shutil.copytree(pipeline_root / "models" / "sft", safety)
        shutil.rmtree(models / "reward")
        attach_lora(_other_base(pipeline_root), lora).save_pretrained(models / "reward")
        return re.escape(f"{models / 'reward'}: this adapter was not made on {models / 'sft'} (size mismatch for ")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "full-weights-of-other-shapes",
        "full-weights-of-another-architecture",
        "adapter-of-another-base",
        "adapter-of-other-modules",
        "stage-1-adapter-of-another-base",
    ],
)
def test_merge_of_policies_that_do_not_fit_is_one_line_and_writes_nothing(
    kind: str, tmp_path: Path, pipeline_root: Path
) -> None:
    """A stage-2 policy (full weights, or the adapter merge folds in) or a stage-1 adapter made on
    another base: one line naming the parameter or the folder, exit 2, and the output folder as
    it was (an earlier merge's files kept, no staging folder left beside it)."""
    models = tmp_path / "models"
    for name in ("sft", "reward"):
        shutil.copytree(pipeline_root / "models" / name, models / name)
    expected = _stage2(kind, models, pipeline_root)
    out = tmp_path / "merged"
    (out / "q0_5").mkdir(parents=True)
    (out / "q0_5" / "merge.json").write_text('{"q": 0.5}\n')  # an earlier merge's output
    before, beside = _tree(out), sorted(tmp_path.iterdir())
    line = _one_error_line(_merge(pipeline_root / "params.yaml", models, out))
    assert re.match(r"error: " + expected, line), line
    assert _tree(out) == before
    assert sorted(tmp_path.iterdir()) == beside


@pytest.fixture(scope="module")
def mergeable(tmp_path_factory: pytest.TempPathFactory, pipeline_root: Path) -> Path:
    """models/ whose two stages merge: the session's sft and stage-1 adapter, and the sft weights
    as a full-weights stage 2."""
    models = tmp_path_factory.mktemp("mergeable") / "models"
    for name in ("sft", "reward"):
        shutil.copytree(pipeline_root / "models" / name, models / name)
    shutil.copytree(pipeline_root / "models" / "sft", models / "safety")
    return models


@pytest.mark.parametrize(
    ("q", "problem"),
    [
        ("1.5", "input should be less than or equal to 1, got 1.5"),
        ("-0.25", "input should be greater than or equal to 0, got -0.25"),
        (".nan", "input should be a finite number, got nan"),
        (".inf", "input should be a finite number, got inf"),
    ],
)
def test_merge_with_a_bad_q_is_one_line_and_writes_nothing(
    q: str, problem: str, tmp_path: Path, mergeable: Path
) -> None:
    """q outside [0, 1], NaN or infinite, given to the merge command itself: one line naming
    merge.q, exit 2, nothing written; the same models with q = 0.5 merge (so the q is what fails)."""
    text = (ROOT / "params.yaml").read_text()
    assert text.count("  q: [0.25, 0.5, 0.75]\n") == 1
    params = tmp_path / "params.yaml"
    params.write_text(text.replace("  q: [0.25, 0.5, 0.75]\n", f"  q: [0.5, {q}]\n"))
    out = tmp_path / "merged"
    line = _one_error_line(_merge(params, mergeable, out))
    assert line == f"error: {params}: merge.q.1: {problem}"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
    params.write_text(text.replace("  q: [0.25, 0.5, 0.75]\n", "  q: [0.5]\n"))
    done = _merge(params, mergeable, out)
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["q0_5"]


def test_merge_of_a_stage_2_folder_without_a_tokenizer_is_one_line_and_writes_nothing(
    tmp_path: Path, pipeline_root: Path
) -> None:
    """merge copies models/safety's tokenizer into each merged policy: a models/safety saved without
    one (the model's weights only) is one line naming it, exit 2, nothing written; with the
    tokenizer files back the same models merge (so they are what failed)."""
    models = tmp_path / "models"
    for name in ("sft", "reward"):
        shutil.copytree(pipeline_root / "models" / name, models / name)
    load_causal_lm(models / "sft").save_pretrained(models / "safety")  # full weights, no tokenizer
    assert not list((models / "safety").glob("tokenizer*"))
    out = tmp_path / "merged"
    line = _one_error_line(_merge(pipeline_root / "params.yaml", models, out))
    safety = models / "safety"
    files = "(tokenizer.json, tokenizer_config.json)"
    assert line == f"error: {safety}: cannot load the tokenizer: no tokenizer files in it {files}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    load_tokenizer(pipeline_root / "data" / "tokenizer").save_pretrained(safety)
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("  q: [0.25, 0.5, 0.75]\n", "  q: [0.5]\n"))
    done = _merge(params, models, out)
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["q0_5"]


# --- a stage-1 adapter made on another base, read by train-safety and evaluate ------------------


def _stage1_of_another_base(tmp_path: Path, pipeline_root: Path) -> tuple[Path, str]:
    """models/ with the session's sft model and, as models/reward, a LoRA adapter made (by peft) on
    a Llama of another width; returns the folder and what the one-line error must say."""
    models = tmp_path / "models"
    shutil.copytree(pipeline_root / "models" / "sft", models / "sft")
    lora = load_params(pipeline_root / "params.yaml").train_reward.lora
    attach_lora(_other_base(pipeline_root), lora).save_pretrained(models / "reward")
    return models, re.escape(f"{models / 'reward'}: this adapter was not made on {models / 'sft'} (size mismatch for ")


def test_the_loaders_name_the_adapter_and_the_model_it_does_not_fit(tmp_path: Path, pipeline_root: Path) -> None:
    """load_aligned_policy (a folded stage 1) and stack_lora (a frozen stage 1 under a new
    adapter) themselves, not only the stages' early check: the adapter's folder, then the model."""
    from rsa_pl.errors import AdapterMismatchError
    from rsa_pl.models import load_aligned_policy, stack_lora

    models, _ = _stage1_of_another_base(tmp_path, pipeline_root)
    reward, sft = models / "reward", models / "sft"
    with pytest.raises(AdapterMismatchError, match="^" + re.escape(f"{reward}: this adapter was not made on {sft} (")):
        load_aligned_policy(sft, reward)
    lora = load_params(pipeline_root / "params.yaml").train_reward.lora
    model = load_causal_lm(sft)
    named = re.escape(f"{reward}: this adapter was not made on {model.name_or_path} (")
    with pytest.raises(AdapterMismatchError, match="^" + named):
        stack_lora(model, reward, lora)


@pytest.mark.parametrize("precision", ["float32", "4-bit"])
def test_train_safety_on_a_stage_1_adapter_of_another_base_is_one_line_and_writes_nothing(
    precision: str, tmp_path: Path, pipeline_root: Path
) -> None:
    """Stage 2 puts the stage-1 adapter on models/sft: folded in (float32), or kept frozen under the
    new adapter (4-bit, stack_lora). Made on another base: exit 2, one line naming models/reward,
    before any training (no checkpoint, no metrics, no models/safety, nothing left beside it)."""
    models, expected = _stage1_of_another_base(tmp_path, pipeline_root)
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((pipeline_root / "params.yaml").read_text())
    if precision == "4-bit":
        raw["train_safety"]["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                               "compute_dtype": "float32"}  # fmt: skip
    params.write_text(yaml.safe_dump(raw))
    before = _tree(models)
    args = ["--params", str(params), "--data", str(pipeline_root / "data"), "--models", str(models),
            "--checkpoints", str(tmp_path / "ckpt"), "--metrics", str(tmp_path / "metrics"),
            "--pairs", str(tmp_path / "pairs")]  # fmt: skip
    result = runner.invoke(app, ["train-safety", *args])
    line = _one_error_line(result)
    assert re.match(r"error: " + expected, line), line
    assert _tree(models) == before
    assert sorted(p.name for p in models.iterdir()) == ["reward", "sft"]  # no staging folder left
    assert not (tmp_path / "metrics").exists()
    assert not list((tmp_path / "ckpt").rglob("*.ckpt"))


def test_evaluate_with_a_stage_1_adapter_of_another_base_is_one_line_before_generating(
    tmp_path: Path, pipeline_root: Path
) -> None:
    """evaluate reads models/reward as the stage-1 adapter folded into models/sft. Made on another
    base: exit 2, one line naming models/reward, found before any policy answers (it was found only
    after models/sft had answered every prompt: 12 s here, hours on a real model): no checkpoint
    of answers, no judge cache, nothing written to --out."""
    models, expected = _stage1_of_another_base(tmp_path, pipeline_root)
    shutil.copytree(pipeline_root / "models" / "sft", models / "safety")  # full weights
    out, checkpoints = tmp_path / "eval", tmp_path / "ckpt"
    result = runner.invoke(app, ["evaluate", "--params", str(pipeline_root / "params.yaml"),
                                 "--data", str(pipeline_root / "data"), "--models", str(models), "--out", str(out),
                                 "--checkpoints", str(checkpoints),
                                 "--judge-cache", str(tmp_path / "judge_cache.sqlite")])  # fmt: skip
    line = _one_error_line(result)
    assert re.match(r"error: " + expected, line), line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no answers kept, no judge cache
