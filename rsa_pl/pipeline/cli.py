"""The one Typer app, console script `rsa-pl`: maps command names to pipeline functions.

A command appears here only once its stage works end to end. Each command imports its stage when
it runs: every stage together imports torch, lightning, transformers and peft (about 9 s on 2
cores), which `rsa-pl --help` and `--version` need not pay at all and `check-params` pays only
in part (torch, through the risk measures): benchmarks/cli_startup.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

import rsa_pl
from rsa_pl.errors import UnavailableError

app = typer.Typer(
    name="rsa-pl",
    help="Risk-aware Stepwise Alignment (RSA) of language models, stage by stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_out = Console()
_err = Console(stderr=True, highlight=False, soft_wrap=True)

ParamsOption = Annotated[Path, typer.Option("--params", help="The params file (see rsa_pl/config.py for every key).")]
MetricsOption = Annotated[
    Path,
    typer.Option("--metrics", help="The stage's dvclive folder: metrics.json and plots/metrics/ (emptied first)."),
]


def _fail(error: Exception, code: int = 2) -> typer.Exit:
    for line in str(error).splitlines():
        _err.print(f"[red]error:[/red] {line}", markup=True)
    return typer.Exit(code)


def _cannot_write(error: OSError, where: Path) -> OSError:
    """A stage's write failure as one line, naming the file (or the stage's output)."""
    return OSError(f"{error.filename or where}: cannot write: {error.strerror or error}")


@app.command("check-params")
def check_params_command(params: ParamsOption = Path("params.yaml")) -> None:
    """Validate a params file, report every problem with its key, show the resolved values."""
    from rsa_pl.params_file import ParamsError
    from rsa_pl.pipeline import check_params

    try:
        check_params.run(params, _out)
    except ParamsError as error:
        raise _fail(error) from None


@app.command("prepare")
def prepare_command(
    params: ParamsOption = Path("params.yaml"),
    out: Annotated[Path, typer.Option("--out", help="The data folder to (re)write.")] = Path("data"),
) -> None:
    """Build the data: the embedded safety world or a real dataset, tokenized, with data/report.json."""
    from rsa_pl.data.sources import DataError
    from rsa_pl.params_file import ParamsError
    from rsa_pl.pipeline import prepare

    try:
        prepare.run(params, out, _out)
    except (ParamsError, DataError) as error:
        raise _fail(error) from None
    except OSError as error:
        raise _fail(_cannot_write(error, out)) from None


@app.command("sft")
def sft_command(
    params: ParamsOption = Path("params.yaml"),
    data: Annotated[Path, typer.Option("--data", help="The prepare stage's output folder.")] = Path("data"),
    out: Annotated[Path, typer.Option("--out", help="The base model folder to (re)write.")] = Path("models/sft"),
    checkpoints: Annotated[
        Path, typer.Option("--checkpoints", help="Checkpoints of this stage (kept for resuming).")
    ] = Path("checkpoints/sft"),
    metrics: MetricsOption = Path("metrics/sft"),
) -> None:
    """Train the embedded base model on the world's SFT set (or save a pretrained base model as is)."""
    if not (data / "tokenizer").exists():
        raise _fail(ValueError(f"{data}: no prepared data (no {data / 'tokenizer'}); run `rsa-pl prepare` first"))
    from rsa_pl.modules import NonFiniteError
    from rsa_pl.params_file import ParamsError
    from rsa_pl.pipeline import sft

    try:
        sft.run(params, data, out, checkpoints, _out, metrics)
    except (ParamsError, UnavailableError) as error:
        raise _fail(error) from None
    except NonFiniteError as error:
        raise _fail(error, code=1) from None
    except OSError as error:
        raise _fail(_cannot_write(error, out)) from None


def _preference_stage(stage: str, needs: str, params: Path, data: Path, models: Path, checkpoints: Path,
                      metrics: Path, made: Path) -> None:  # fmt: skip
    from rsa_pl.modules import NonFiniteError
    from rsa_pl.params_file import ParamsError, load_params
    from rsa_pl.pipeline import preference

    try:
        folder = preference.pairs_folder(getattr(load_params(params), stage))
    except ParamsError as error:
        raise _fail(error) from None
    if not preference.pairs_path(data, made, folder).exists():
        first = "`rsa-pl make-pairs`" if (data / "prompts").exists() else "`rsa-pl prepare`"
        raise _fail(ValueError(f"{data / folder}: no pairs (nor in {made}); run {first} first"))
    if not (models / needs).exists():
        command = {"sft": "sft", "reward": "train-reward"}[needs]
        raise _fail(ValueError(f"{models / needs}: not found; run `rsa-pl {command}` first"))
    try:
        preference.run(stage, params, data, models, checkpoints, _out, metrics, made)
    except (ParamsError, UnavailableError) as error:
        raise _fail(error) from None
    except NonFiniteError as error:
        raise _fail(error, code=1) from None
    except OSError as error:
        raise _fail(_cannot_write(error, models)) from None


DataOption = Annotated[Path, typer.Option("--data", help="The prepare stage's output folder.")]
ModelsOption = Annotated[Path, typer.Option("--models", help="The folder holding sft/, reward/, safety/.")]
JudgeCacheOption = Annotated[
    Path, typer.Option("--judge-cache", help="The llm judge's reply cache (kept across runs: no request twice).")
]
PairsOption = Annotated[
    Path, typer.Option("--pairs", help="The make-pairs stage's folder (on-policy pairs); else data/'s pairs.")
]


@app.command("make-pairs")
def make_pairs_command(
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data"),
    models: ModelsOption = Path("models"),
    out: Annotated[Path, typer.Option("--out", help="The pairs folder to (re)write.")] = Path("pairs"),
    checkpoints: Annotated[
        Path, typer.Option("--checkpoints", help="Judged answers per chunk of prompts, for resuming a killed run.")
    ] = Path("checkpoints/pairs"),
    judge_cache: JudgeCacheOption = Path("checkpoints/judge_cache.sqlite"),
) -> None:
    """Prompts only: the base answers each prompt k times, a judge scores them, best vs worst -> pairs/."""
    if not (models / "sft").exists():
        raise _fail(ValueError(f"{models / 'sft'}: not found; run `rsa-pl sft` first"))
    from rsa_pl.evaluation.judges import JudgeError
    from rsa_pl.params_file import ParamsError
    from rsa_pl.pipeline import evaluate, pairs

    try:
        pairs.run(params, data, models, out, _out, checkpoints, judge_cache)
    except (ParamsError, evaluate.EvaluateError, JudgeError, UnavailableError, ValueError) as error:
        raise _fail(error) from None
    except OSError as error:
        raise _fail(_cannot_write(error, out)) from None


@app.command("train-reward")
def train_reward_command(
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data"),
    models: ModelsOption = Path("models"),
    checkpoints: Annotated[Path, typer.Option("--checkpoints")] = Path("checkpoints/train_reward"),
    metrics: MetricsOption = Path("metrics/train_reward"),
    pairs: PairsOption = Path("pairs"),
) -> None:
    """Stage 1: helpfulness alignment of the SFT model (reference: the SFT model) -> models/reward."""
    _preference_stage("train_reward", "sft", params, data, models, checkpoints, metrics, pairs)


@app.command("train-safety")
def train_safety_command(
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data"),
    models: ModelsOption = Path("models"),
    checkpoints: Annotated[Path, typer.Option("--checkpoints")] = Path("checkpoints/train_safety"),
    metrics: MetricsOption = Path("metrics/train_safety"),
    pairs: PairsOption = Path("pairs"),
) -> None:
    """Stage 2: safety realignment of the stage-1 policy (reference: the stage-1 policy) -> models/safety."""
    _preference_stage("train_safety", "reward", params, data, models, checkpoints, metrics, pairs)


@app.command("merge")
def merge_command(
    params: ParamsOption = Path("params.yaml"),
    models: ModelsOption = Path("models"),
    out: Annotated[Path, typer.Option("--out", help="The folder of merged policies to (re)write.")] = Path(
        "models/merged"
    ),
) -> None:
    """RSA(P): (1 - q) x stage-1 policy + q x stage-2 policy for each q in params -> models/merged/q<q>."""
    for needs, command in (("reward", "train-reward"), ("safety", "train-safety")):
        if not (models / needs).exists():
            raise _fail(ValueError(f"{models / needs}: not found; run `rsa-pl {command}` first"))
    from rsa_pl.merge import MergeError
    from rsa_pl.params_file import ParamsError
    from rsa_pl.pipeline import merge

    try:
        merge.run(params, models, out, _out)
    except (ParamsError, MergeError, UnavailableError) as error:
        raise _fail(error) from None
    except OSError as error:
        raise _fail(_cannot_write(error, out)) from None


@app.command("evaluate")
def evaluate_command(
    params: ParamsOption = Path("params.yaml"),
    data: DataOption = Path("data"),
    models: ModelsOption = Path("models"),
    out: Annotated[Path, typer.Option("--out", help="The evaluation folder to (re)write.")] = Path("eval"),
    checkpoints: Annotated[
        Path, typer.Option("--checkpoints", help="Each finished policy's answers, for resuming a killed run.")
    ] = Path("checkpoints/evaluate"),
    judge_cache: JudgeCacheOption = Path("checkpoints/judge_cache.sqlite"),
) -> None:
    """Every policy (sft, reward, safety, merged q) answers the held-out prompts; judge, metrics, plots -> eval/."""
    from rsa_pl.evaluation.judges import JudgeError
    from rsa_pl.params_file import ParamsError
    from rsa_pl.pipeline import evaluate

    try:
        evaluate.run(params, data, models, out, _out, checkpoints, judge_cache)
    except (ParamsError, evaluate.EvaluateError, JudgeError, UnavailableError) as error:
        raise _fail(error) from None
    except OSError as error:
        raise _fail(_cannot_write(error, out)) from None


def _version(value: bool) -> None:
    if value:
        _out.print(f"rsa-pl {rsa_pl.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Risk-aware Stepwise Alignment (RSA) of language models, stage by stage."""


if __name__ == "__main__":
    app()
