"""The embedded-world experiment: every method of experiments/grid.py x every seed, as DVC
experiments of the one DAG, then reports/embedded.md from their metrics.

    python experiments/embedded.py run      # queue what is missing, run the queue, write the report
    python experiments/embedded.py report   # merge this clone's experiments into runs.json, write the report

`run` queues every experiment that neither DVC (this clone's refs/exps) nor
reports/embedded/runs.json (the committed record, with the params the grid sets now) holds;
within one, a stage whose deps and params a finished run had (prepare, sft, an anchoring run's
stage 1) is restored from DVC's run-cache instead of run again. Not `--force`: that reruns every
stage. The queue runs in tiers (grid.queue_order: the headline at three seeds first). Each
experiment runs in its own DVC temp workspace; prepare and sft come from the DVC cache (the
baseline's dvc.lock), so every method of every seed starts from the same SFT model, as in the
paper. What is left here is what DVC does not do: choosing what to queue, restarting a stalled
queue, and the report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.grid import SETTINGS, queue_order  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(highlight=False)
RUNS = ROOT / "reports" / "embedded" / "runs.json"
WORKER_GRACE_S = 120.0  # seconds a queue may sit with tasks queued and none running before workers start again


class ExperimentError(RuntimeError):
    """A DVC command of the experiment failed."""


def _dvc(*args: str, env: dict[str, str] | None = None, capture: bool = True) -> str:
    """Run dvc; its stdout, or "" when not captured. Captured output goes through temp files, not
    pipes: `dvc queue start` leaves daemon workers that inherit the output, and a pipe would stay
    open (and this call block) until the last of them exits."""
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if dvc is None:
        raise ExperimentError("dvc: not found next to this Python or on PATH; install rsa-pl first (pip install -e .)")
    if not capture:
        done = subprocess.run([dvc, *args], cwd=ROOT, env=env, check=False)
        stdout = stderr = ""
    else:
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            done = subprocess.run([dvc, *args], cwd=ROOT, env=env, stdout=out, stderr=err, text=True, check=False)
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
    if done.returncode != 0:
        detail = (stderr or stdout).strip().splitlines()
        raise ExperimentError(f"dvc {' '.join(args)}: exit {done.returncode}: {detail[-1] if detail else ''}")
    return stdout


def _env(jobs: int) -> dict[str, str]:
    """The queue workers' environment: this venv first on PATH, cores split between the jobs."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("MKL_NUM_THREADS", str(threads))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def parse_queue_status(text: str) -> tuple[dict[str, str], int]:
    """(name -> Queued | Running | Success | Failed, workers alive) from dvc queue status's output."""
    status: dict[str, str] = {}
    workers = 0
    for line in text.splitlines()[1:]:
        parts = line.split()  # Task, Name, Created (one or more words), Status
        if line.startswith("Worker status:"):  # "Worker status: 1 active, 0 idle"
            workers = sum(int(n) for n in re.findall(r"(\d+) (?:active|idle)", line))
        elif len(parts) >= 3 and parts[-1] in {"Queued", "Running", "Success", "Failed"}:
            status[parts[1]] = parts[-1]
    return status, workers


def queue_status() -> dict[str, str]:
    """name -> Queued | Running | Success | Failed, from dvc queue status."""
    return parse_queue_status(_dvc("queue", "status"))[0]


def start_workers(jobs: int) -> None:
    """dvc queue start -j jobs: starts the workers among 1..jobs that dvc does not see alive."""
    _dvc("queue", "start", "-j", str(jobs), env=_env(jobs))


@app.command()
def run(
    jobs: Annotated[int, typer.Option(help="Experiments run at once (the cores are split between them).")] = 2,
    seeds: Annotated[
        list[int] | None, typer.Option("--seed", help="Only these seeds (repeat the option); default each setting's.")
    ] = None,
    only: Annotated[list[str] | None, typer.Option(help="Only these settings (grid names; repeatable).")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between queue polls.")] = 30.0,
    queue_only: Annotated[bool, typer.Option(help="Only queue (workers already running pick them up).")] = False,
) -> None:
    """Queue every (setting, seed) experiment (finished ones come back from the run-cache), run
    the queue, then write the report."""
    started = time.monotonic()
    chosen = [s for s in SETTINGS if not only or s.name in only]
    unknown = set(only or []) - {s.name for s in SETTINGS}
    if unknown:
        raise typer.BadParameter(f"not in experiments/grid.py: {', '.join(sorted(unknown))}", param_hint="--only")
    console.print("embedded: making sure prepare and sft are in the DVC cache (dvc checkout; dvc repro sft)")
    try:
        _dvc("checkout")
    except ExperimentError as error:  # a fresh clone without the cache: repro builds them
        console.print(f"embedded: {error}")
    _dvc("repro", "sft", capture=False)  # a no-op when models/sft matches dvc.lock
    pending = queue_status()
    finished = set(_finished()) | set(_recorded())
    queued: list[str] = []
    for setting, seed in queue_order():  # the headline comparison first
        name = setting.experiment(seed)
        if setting not in chosen or (seeds and seed not in seeds) or pending.get(name) in {"Queued", "Running"}:
            continue
        if name in finished:
            continue
        sets = [arg for key, value in setting.overrides(seed).items() for arg in ("-S", f"{key}={value}")]
        # no --force: it reruns every stage, run-cache or not (round 2's first queue retrained SFT each time)
        _dvc("exp", "run", "--queue", "-n", name, *sets)
        queued.append(name)
    console.print(f"embedded: {len(queued)} experiments queued (finished ones are restored from the run-cache)")
    if queue_only:
        return
    console.print(f"embedded: running the queue with {jobs} jobs")
    if queued or any(v in {"Queued", "Running"} for v in pending.values()):
        start_workers(jobs)
        _wait(poll, jobs)
    status = queue_status()  # a name's newest task last
    failed = sorted(name for name in queued if status.get(name) == "Failed")
    minutes = (time.monotonic() - started) / 60
    console.print(f"embedded: queue finished after {minutes:.1f} min")
    report()
    if failed:
        console.print(f"error: {len(failed)} experiments failed: {', '.join(failed)}; see `dvc queue logs <name>`")
        raise typer.Exit(1)


def _recorded() -> list[str]:
    """The experiments runs.json holds with the params the grid sets now: the record that outlives
    the clone (DVC's experiment refs stay in the clone that ran them)."""
    from experiments.collect import merge_runs

    recorded = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    return list(merge_runs(recorded, {})["experiments"])  # merge_runs keeps what the grid still sets


def _finished() -> list[str]:
    """The names of the experiments DVC holds (finished ones, of any baseline commit)."""
    shown = _dvc("exp", "list", "--all-commits", "--name-only")
    return [line.strip() for line in shown.splitlines() if line.strip()]


def _wait(poll: float, jobs: int) -> None:
    """Poll until nothing is queued or running; start the workers again if the queue stalls.

    A worker can die between tasks (seen with DVC 3's celery filesystem broker: a JSONDecodeError
    reading a message file another worker was writing). With one of two gone the queue runs on,
    slower; with none it stalls: tasks queued, none running. Only then are workers started again,
    because only then is the answer to "which workers are alive" trustworthy: a worker busy with
    a task may miss dvc's status query, and `dvc queue start` then starts a second worker under
    the same name (seen here: three experiments ran at once on two workers' names)."""
    last = ""
    stalled_since: float | None = None
    while True:
        status, workers = parse_queue_status(_dvc("queue", "status"))
        counts = {
            state: sum(1 for v in status.values() if v == state) for state in ("Queued", "Running", "Success", "Failed")
        }
        line = ", ".join(f"{n} {state.lower()}" for state, n in counts.items()) + f"; {workers} workers"
        if line != last:
            console.print(f"embedded: {time.strftime('%H:%M:%S')} {line}")
            last = line
        if counts["Queued"] == 0 and counts["Running"] == 0:
            return
        if counts["Queued"] and not counts["Running"]:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > WORKER_GRACE_S:
                console.print(f"embedded: {counts['Queued']} queued and none running: starting the workers again")
                start_workers(jobs)
                stalled_since = None
        else:
            stalled_since = None
        time.sleep(poll)


@app.command()
def report(
    collect: Annotated[
        bool, typer.Option(help="Merge the experiments of this clone (their git refs) into runs.json first.")
    ] = True,
) -> None:
    """Write reports/embedded.md (and its figures) from reports/embedded/runs.json."""
    from experiments import render as report_module  # matplotlib only for the report
    from experiments.collect import collect_refs, merge_runs

    if collect:
        recorded = json.loads(RUNS.read_text()) if RUNS.exists() else {}
        collected = collect_refs(ROOT)
        runs = merge_runs(recorded, collected)
        RUNS.parent.mkdir(parents=True, exist_ok=True)
        RUNS.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
        kept = len(runs["experiments"]) - len(collected["experiments"])
        console.print(
            f"embedded: {len(collected['experiments'])} experiments from this clone's refs, {kept} kept from"
            f" {RUNS.relative_to(ROOT)} -> {len(runs['experiments'])}"
        )
    runs = json.loads(RUNS.read_text())
    out = report_module.write(runs, ROOT / "reports")
    console.print(f"embedded: wrote {out.relative_to(ROOT)}")


def main() -> None:
    try:
        app()
    except ExperimentError as error:
        console.print(f"error: {error}")
        sys.exit(2)


if __name__ == "__main__":
    main()
