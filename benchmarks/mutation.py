"""Mutation testing of the core: does the suite notice when the code that decides results is wrong?

    python benchmarks/mutation.py                      # every target, 2 workers (~1-2 h on 2 cores)
    python benchmarks/mutation.py --target risk --target losses --workers 1
    python benchmarks/mutation.py --list --target merge   # the mutants, without running them

Writes benchmarks/results/mutation.json (every mutant and its fate) and mutation.md (the scores
per target, every surviving mutant, and the equivalent ones with the reason each is equivalent,
from benchmarks/mutation_equivalent.toml). Outside the default test run: it is slow.

Why our own and not mutmut or cosmic-ray (both read, docs/benchmarks.md):
- mutmut 3 does not mutate decorated functions (file_mutation.py skips any decorator but
  staticmethod/classmethod), and the CVaR thresholds (`@torch.no_grad()` in rsa_pl/risk.py)
  and the reference forward (`@torch.inference_mode()`) are such functions; nor does it mutate
  module-level code such as the risk-measure registry, where swapping two entries is a real bug.
- cosmic-ray runs each mutant as a new test process: importing torch, transformers and Lightning
  costs seconds a mutant, over a thousand mutants.
Here each mutant is a forked child of a process that has those imported: it swaps in the mutated
module (compiled from the mutated syntax tree, so line numbers stay the source's) and runs, with
pytest -x, only the tests that executed the mutated statement in a traced baseline run, fastest
first. A mutant is killed when a test fails or errors (or it runs past 3x the tests' baseline time).

Operators (one change per mutant): arithmetic and bitwise operators (+ -, * /, // /, ** *, & |),
comparisons (< <=, > >=, == !=, is / is not, in / not in), and / or, dropping not / unary minus /
~, numbers n -> n+1, True <-> False, strings -> "XX"+s+"XX" (outside messages), min <-> max and
kin (amin/amax, argmin/argmax, minimum/maximum, clamp_min/clamp_max, floor/ceil, sum/mean,
logsumexp/amax), dropping .detach(), swapping a call's first two positional arguments, negating an
if/while/ternary condition that is not a comparison, deleting a call statement, dropping a
decorator.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import hashlib
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.toml"


@dataclass(frozen=True)
class Target:
    """Where a silent bug changes results: a module (or some of its functions) and the tests
    that may notice (each mutant runs only those of them that executed its statement)."""

    key: str
    module: str
    scope: tuple[str, ...] = ()  # qualified names of functions/classes (nested code included); () = all
    tests: tuple[str, ...] = ()


CORE_TESTS = ("tests/test_risk.py", "tests/test_losses.py", "tests/test_loss_reference.py", "tests/test_fast.py")
TARGETS = (
    Target("risk", "rsa_pl.risk", (), CORE_TESTS),
    Target("losses", "rsa_pl.losses", (), CORE_TESTS),
    Target("losses", "rsa_pl.fast.cvar", (), CORE_TESTS),  # the training path's CVaR and chunked terms
    Target("losses", "rsa_pl.fast.chunked", (), CORE_TESTS),
    Target("merge", "rsa_pl.merge", (), ("tests/test_merge.py", "tests/test_qlora.py", "tests/test_cli.py")),
    Target(
        "reference",
        "rsa_pl.pipeline.preference",
        ("_starting_policy", "_is_adapter", "policy_and_reference"),
        ("tests/test_preference.py", "tests/test_qlora.py", "tests/test_training.py"),
    ),
    Target(
        "reference",
        "rsa_pl.modules",
        (
            "next_token_targets",
            "logits_window",
            "PreferenceModule.__init__",
            "PreferenceModule.reference_logits",
            "PreferenceModule.losses",
        ),
        ("tests/test_preference.py", "tests/test_qlora.py", "tests/test_training.py", "tests/test_losses.py"),
    ),
    Target(
        "reference",
        "rsa_pl.models",
        ("stack_lora", "only_adapters", "load_aligned_policy", "attach_lora"),
        (
            "tests/test_preference.py",
            "tests/test_qlora.py",
            "tests/test_merge.py",
            "tests/test_cli.py",
            "tests/test_security.py",
        ),
    ),
    Target(
        "pair labelling",
        "rsa_pl.pipeline.prepare",
        ("_Tokenized.pairs",),
        ("tests/test_prepare.py", "tests/test_world.py", "tests/test_sources.py"),
    ),
    Target("pair labelling", "rsa_pl.pipeline.pairs", ("_pairs",), ("tests/test_pairs.py", "tests/test_training.py")),
    Target(
        "judges",
        "rsa_pl.evaluation.judges",
        (
            "OracleJudge",
            "unsafe_label",
            "encode",
            "_pad_id",
            "ScoreModel",
            "_safe_rlhf_head",
            "ScoreModelJudge",
            "UNSAFE_WORDS",
            "SAFE_PREFIXES",
            "SAFE_RLHF_FORMAT",
        ),
        ("tests/test_judges.py", "tests/test_evaluation.py", "tests/test_security.py"),
    ),
    Target(
        "judges",
        "rsa_pl.evaluation.guard",
        (
            "parse_reply",
            "verdict_token_ids",
            "rating_token_ids",
            "expected_rating",
            "verdict_cost",
            "GuardJudge._cost",
            "GuardJudge._verdict",
            "GuardJudge.__call__",
        ),
        ("tests/test_judges.py",),
    ),
    Target(
        "judges",
        "rsa_pl.evaluation.llm_judge",
        (
            "first_line",
            "_numbers",
            "_labelled",
            "_in_scale",
            "parse_pointwise",
            "parse_pair",
            "pointwise_verdict",
            "outcome",
        ),
        ("tests/test_llm_judge.py",),
    ),
    Target("metrics", "rsa_pl.evaluation.metrics", (), ("tests/test_evaluation.py", "tests/test_bootstrap.py")),
    Target("metrics", "rsa_pl.evaluation.bootstrap", (), ("tests/test_bootstrap.py", "tests/test_evaluation.py")),
)
# Too slow for a run per mutant (a DVC pipeline, DDP processes): their subprocesses would not see
# the mutant anyway, since it lives in the forked test process only.
DESELECT = ("tests/test_prepare.py::test_dvc_repro_runs_the_pipeline",)

# ---------------------------------------------------------------------------------------------
# Mutants


@dataclass
class Mutant:
    id: str
    target: str
    module: str
    qualname: str
    line: int
    end_line: int
    operator: str
    before: str
    after: str
    in_function: bool
    status: str = "pending"  # killed | survived | timeout | uncovered
    tests_run: int = 0
    seconds: float = 0.0
    killed_by: str | None = None
    reason: str | None = None  # for equivalent mutants
    carried: bool = False  # killed in the --carry run, not run again
    path: tuple = field(default=(), repr=False)  # where in the tree: list of (attribute, index)


SWAPS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Pow: ast.Mult, ast.Mod: ast.FloorDiv, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.BitXor: ast.BitOr,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}  # fmt: skip
NAMES = {}
for a, b in [("min", "max"), ("amin", "amax"), ("argmin", "argmax"), ("minimum", "maximum"),
             ("clamp_min", "clamp_max"), ("floor", "ceil"), ("cummax", "cummin")]:  # fmt: skip
    NAMES[a], NAMES[b] = b, a
NAMES.update({"sum": "mean", "mean": "sum", "logsumexp": "amax"})
# Calls whose first two arguments commute: swapping them is no mutant.
COMMUTATIVE = {"promote_types", "maximum", "minimum", "max", "min", "logaddexp", "add", "mul", "isclose", "eq",
               "allclose", "zip", "fmax", "fmin"}  # fmt: skip
QUIET_CALLS = {"print", "warn", "info", "debug", "warning", "error", "echo", "log", "add_note"}


def _children(node: ast.AST) -> Iterator[tuple[str, int | None, ast.AST]]:
    for name, value in ast.iter_fields(node):
        if isinstance(value, ast.AST):
            yield name, None, value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, ast.AST):
                    yield name, i, item


def _get(tree: ast.AST, path: tuple) -> ast.AST:
    node = tree
    for name, index in path:
        node = getattr(node, name) if index is None else getattr(node, name)[index]
    return node


def _set(tree: ast.AST, path: tuple, new: ast.AST | None) -> None:
    parent = _get(tree, path[:-1])
    name, index = path[-1]
    if index is None:
        setattr(parent, name, new)
    elif new is None:
        del getattr(parent, name)[index]
    else:
        getattr(parent, name)[index] = new


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _variants(node: ast.AST, parent: ast.AST, name: str, index: int | None, quiet: bool
              ) -> Iterator[tuple[str, ast.AST | None]]:  # fmt: skip
    """(operator, replacement node or None to delete) for one node."""
    if isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in SWAPS:
        new = copy.deepcopy(node)
        new.op = SWAPS[type(node.op)]()
        yield "binop", new
    elif isinstance(node, ast.BoolOp):
        new = copy.deepcopy(node)
        new.op = SWAPS[type(node.op)]()
        yield "boolop", new
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in SWAPS:
                new = copy.deepcopy(node)
                new.ops[i] = SWAPS[type(op)]()
                yield "compare", new
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
        yield "unary", copy.deepcopy(node.operand)
    elif isinstance(node, ast.Constant) and not quiet:
        v = node.value
        if isinstance(v, bool):
            yield "constant", ast.Constant(not v)
        elif isinstance(v, (int, float)) and v + 1 != v:
            yield "constant", ast.Constant(v + 1)
        elif isinstance(v, str) and not isinstance(parent, ast.Expr):  # a bare string is a docstring
            yield "string", ast.Constant(f"XX{v}XX")
    elif isinstance(node, ast.Attribute) and node.attr in NAMES:
        new = copy.deepcopy(node)
        new.attr = NAMES[node.attr]
        yield "name", new
    elif isinstance(node, ast.Call):
        if _call_name(node) == "detach" and isinstance(node.func, ast.Attribute) and not node.args:
            yield "detach", copy.deepcopy(node.func.value)
        positional = [a for a in node.args if not isinstance(a, ast.Starred)]
        swappable = len(positional) >= 2 and node.args[:2] == positional[:2] and _call_name(node) not in COMMUTATIVE
        if swappable and ast.dump(positional[0]) != ast.dump(positional[1]):
            new = copy.deepcopy(node)
            new.args[0], new.args[1] = new.args[1], new.args[0]
            yield "swap args", new
    elif isinstance(node, (ast.If, ast.While, ast.IfExp)) and not (
        isinstance(node.test, (ast.Compare, ast.BoolOp))
        or (isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not))
    ):  # a comparison or a not has its own operators
        new = copy.deepcopy(node)
        new.test = ast.UnaryOp(ast.Not(), new.test)
        yield "negate", new
    if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and _call_name(node.value) not in QUIET_CALLS
            and index is not None):  # fmt: skip
        siblings = getattr(parent, name)
        yield "delete call", ast.Pass() if len(siblings) == 1 else None
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        for i in range(len(node.decorator_list)):
            new = copy.deepcopy(node)
            del new.decorator_list[i]
            yield "decorator", new


def _walk(
    tree: ast.Module, scope: tuple[str, ...]
) -> Iterator[tuple[tuple, ast.AST, ast.AST, str, int | None, str, bool, bool]]:
    """(path, node, parent, field, index, qualname, in_function, quiet) for every node in scope.
    in_function: the node runs when a function is called (not at import: decorators, defaults and
    class bodies run where their def/class is); quiet: inside a message (raise, f-string, print)."""

    def visit(node: ast.AST, path: tuple, names: tuple[str, ...], in_function: bool, quiet: bool):
        for name, index, child in _children(node):
            if (
                name in ("annotation", "returns", "type_comment")
                or isinstance(child, (ast.Import, ast.ImportFrom))
                or (isinstance(child, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in child.targets))
            ):
                continue
            here = (*path, (name, index))
            is_def = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            child_names = (*names, child.name) if is_def else names
            if not names and isinstance(child, ast.Assign) and isinstance(child.targets[0], ast.Name):
                child_names = (child.targets[0].id,)  # a module-level constant, by its name
            runs_inside = in_function or (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                                          and name == "body")  # fmt: skip
            child_quiet = (
                quiet
                or isinstance(child, (ast.JoinedStr, ast.Raise))
                or (isinstance(child, ast.Call) and _call_name(child) in QUIET_CALLS)
            )
            qual = ".".join(child_names)
            if not scope or any(qual == s or qual.startswith(s + ".") for s in scope):
                yield here, child, node, name, index, qual, runs_inside, child_quiet
            yield from visit(child, here, child_names, runs_inside, child_quiet)

    yield from visit(tree, (), (), False, False)


def _statement_lines(tree: ast.Module) -> dict[int, tuple[int, int]]:
    """line -> the innermost enclosing simple statement's (first, last) line."""
    spans: dict[int, tuple[int, int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.stmt) and not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.If, ast.For,
                                                                 ast.While, ast.With, ast.Try)):  # fmt: skip
            for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
                old = spans.get(line)
                if old is None or old[1] - old[0] > (node.end_lineno or node.lineno) - node.lineno:
                    spans[line] = (node.lineno, node.end_lineno or node.lineno)
    return spans


def source_path(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        sys.exit(f"{module}: not an importable module")
    return Path(spec.origin)


def mutants_of(target: Target) -> tuple[ast.Module, list[Mutant]]:
    path = source_path(target.module)
    text = path.read_text()
    tree = ast.parse(text, str(path))
    spans = _statement_lines(tree)
    out: list[Mutant] = []
    seen: dict[str, int] = {}
    for where, node, parent, name, index, qual, in_function, quiet in _walk(tree, target.scope):
        for operator, new in _variants(node, parent, name, index, quiet):
            before = ast.get_source_segment(text, node) or ast.unparse(node)
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                before = "\n".join(f"@{ast.unparse(d)}" for d in node.decorator_list) + f"\ndef {node.name}"
                after = "\n".join(f"@{ast.unparse(d)}" for d in new.decorator_list) + f"\ndef {node.name}"
            else:
                after = (
                    "<deleted>"
                    if new is None or (isinstance(new, ast.Pass) and operator == "delete call")
                    else (ast.unparse(new))
                )
            key = f"{target.module}|{qual}|{operator}|{before}|{after}"
            n = seen[key] = seen.get(key, -1) + 1
            digest = hashlib.sha1(f"{key}#{n}".encode()).hexdigest()[:8]
            line = getattr(node, "lineno", 0)
            first, last = spans.get(line, (line, getattr(node, "end_lineno", line) or line))
            if isinstance(node, ast.stmt):
                first, last = node.lineno, node.end_lineno or node.lineno
            m = Mutant(f"{target.module.rsplit('.', 1)[-1]}-{digest}", target.key, target.module, qual or "<module>",
                       first, last, operator, before, after, in_function)  # fmt: skip
            m.path = where
            m.__dict__["_new"] = new
            out.append(m)
    return tree, out


def mutated_code(tree: ast.Module, mutant: Mutant, filename: str):
    tree = copy.deepcopy(tree)
    new = mutant.__dict__["_new"]
    if new is not None:
        old = _get(tree, mutant.path)
        ast.copy_location(new, old)
        ast.fix_missing_locations(new)
        for child in ast.walk(new):  # a node made here (a negation, a constant) has no position yet
            if not hasattr(child, "lineno") and hasattr(old, "lineno"):
                ast.copy_location(child, old)
    _set(tree, mutant.path, new)
    ast.fix_missing_locations(tree)
    return compile(tree, filename, "exec")


# ---------------------------------------------------------------------------------------------
# Running


class _MutatedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, module: str, code, path: str) -> None:
        self.module, self.code, self.path = module, code, path

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=self.path)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        module.__file__ = self.path
        exec(self.code, module.__dict__)


def _forget_project_modules() -> None:
    for name in list(sys.modules):
        if name == "rsa_pl" or name.startswith(("rsa_pl.", "tests.", "conftest")) or name == "tests":
            del sys.modules[name]


PYTEST_ARGS = ["-q", "-o", "addopts=", "-p", "no:cacheprovider", "-p", "no:randomly", "--strict-markers",
               "-W", "error:.*autograd kernel was not registered.*:UserWarning", "--no-header", "-rN"]  # fmt: skip


class _Recorder:
    """A pytest plugin: each test's duration and outcome, the first test that failed, and (with
    a coverage.Coverage) the test's name as the coverage context of what it runs."""

    def __init__(self, coverage=None) -> None:
        self.coverage, self.durations, self.outcomes, self.failed = coverage, {}, {}, None

    def plugin(self):
        import pytest

        recorder = self

        class Plugin:
            @pytest.hookimpl(hookwrapper=True)
            def pytest_runtest_protocol(self, item, nextitem):
                if recorder.coverage is not None:
                    recorder.coverage.switch_context(item.nodeid)  # setup, call and teardown
                start = time.perf_counter()
                yield
                recorder.durations[item.nodeid] = time.perf_counter() - start

            def pytest_runtest_logreport(self, report) -> None:
                if report.failed and recorder.failed is None:
                    recorder.failed = report.nodeid
                if report.when == "call" or report.failed:
                    recorder.outcomes[report.nodeid] = report.outcome if report.when == "call" else "failed"

        return Plugin()


def _in_child(run, log: Path, result: Path, timeout: float | None) -> tuple[int, float]:
    """Fork; the child runs run() with its output in log and writes result; (exit code, seconds)."""
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.setsid()
            code = run(result)
        except BaseException as error:
            print(f"mutation child: {error!r}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(int(code))
    deadline = None if timeout is None else start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.perf_counter() - start
        if deadline is not None and time.perf_counter() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9, time.perf_counter() - start
        time.sleep(0.05)


def _pytest(args: list[str], recorder: _Recorder) -> int:
    import pytest

    _forget_project_modules()
    return int(pytest.main([*args, *PYTEST_ARGS], plugins=[recorder.plugin()]))


def baseline(test_files: list[str], traced: set[str], work: Path) -> dict:
    """Run the tests once, unmutated, recording (coverage.py, one context per test) which lines
    of the targets each test executes."""

    def run(result: Path) -> int:
        import coverage

        cov = coverage.Coverage(data_file=None, include=sorted(traced))
        recorder = _Recorder(cov)
        cov.start()
        try:
            code = _pytest([*test_files, *[f"--deselect={d}" for d in DESELECT]], recorder)
        finally:
            cov.stop()
        data, lines = cov.get_data(), {}
        for f in traced:
            for line, contexts in data.contexts_by_lineno(f).items():
                for context in contexts:
                    lines.setdefault(context, []).append((f, line))
        result.write_text(json.dumps({"lines": lines, "durations": recorder.durations,
                                      "outcomes": recorder.outcomes}))  # fmt: skip
        return code

    out = work / "baseline.json"
    code, seconds = _in_child(run, work / "baseline.log", out, None)
    if not out.exists():
        sys.exit(f"the baseline run wrote nothing (exit {code}); see {work / 'baseline.log'}")
    data = json.loads(out.read_text())
    data["seconds"] = seconds
    return data


def run_mutant(tree: ast.Module, mutant: Mutant, tests: list[str], budget: float, work: Path) -> None:
    path = str(source_path(mutant.module))
    try:
        code = mutated_code(tree, mutant, path)
    except (SyntaxError, ValueError, TypeError) as error:  # a mutant that cannot compile is no mutant
        mutant.status, mutant.killed_by = "invalid", repr(error)
        return

    def run(result: Path) -> int:
        import torch

        torch.set_num_threads(1)
        sys.meta_path.insert(0, _MutatedFinder(mutant.module, code, path))
        recorder = _Recorder()
        exit_code = _pytest(["-x", *tests], recorder)
        result.write_text(json.dumps({"failed": recorder.failed}))
        return exit_code

    result = work / f"{mutant.id}.json"
    exit_code, seconds = _in_child(run, work / f"{mutant.id}.log", result, budget)
    mutant.tests_run, mutant.seconds = len(tests), round(seconds, 2)
    if exit_code == -9:
        mutant.status = "timeout"
    elif exit_code == 0:
        mutant.status = "survived"
    else:
        mutant.status = "killed"
        mutant.killed_by = json.loads(result.read_text())["failed"] if result.exists() else f"exit {exit_code}"
    if mutant.status == "killed":
        (work / f"{mutant.id}.log").unlink(missing_ok=True)


def _preload(test_files: list[str]) -> None:
    """Import what the tests import (torch, transformers, Lightning...) once, in the parent, so
    that every forked child starts with them; the project's own modules are forgotten again.
    (Plain imports: a pytest run here would leave loggers writing to its closed capture.)"""
    import importlib

    for f in test_files:
        importlib.import_module(f.removesuffix(".py").replace("/", "."))
    _forget_project_modules()


def select(mutant: Mutant, base: dict, target: Target, path: str) -> list[str]:
    durations, outcomes = base["durations"], base["outcomes"]
    ok = [t for t in durations if outcomes.get(t) == "passed" and t.split("::")[0] in target.tests]
    if mutant.in_function:
        lines = set(range(mutant.line, mutant.end_line + 1))
        ok = [t for t in ok if any(f == path and line in lines for f, line in base["lines"].get(t, []))]
    return sorted(ok, key=lambda t: durations[t])


def load_equivalent() -> dict[str, str]:
    if not EQUIVALENT.exists():
        return {}
    return {e["id"]: e["reason"] for e in tomllib.loads(EQUIVALENT.read_text()).get("equivalent", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", help="a target key (repeatable); default: all")
    parser.add_argument("--module", action="append", help="only this module of the targets (repeatable)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--list", action="store_true", help="print the mutants and stop")
    parser.add_argument("--out", type=Path, default=RESULTS / "mutation", help="results prefix (.json and .md)")
    parser.add_argument("--only", action="append", help="run only these mutant ids (repeatable)")
    parser.add_argument("--carry", type=Path, help="a previous run's .json: its killed mutants (same id: same module, "
                        "function and change) count as killed without running again, and the equivalent ones listed "
                        "in benchmarks/mutation_equivalent.toml as survivors; the rest run")  # fmt: skip
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    targets = [
        t for t in TARGETS if (not args.target or t.key in args.target) and (not args.module or t.module in args.module)
    ]
    if not targets:
        sys.exit(f"--target: none of {args.target} is one of {sorted({t.key for t in TARGETS})}")
    made = [(t, *mutants_of(t)) for t in targets]
    if args.list:
        for t, _, mutants in made:
            for m in mutants:
                print(f"{m.id}  {t.key:15} {m.module}:{m.line} {m.operator:12} {m.before!r} -> {m.after!r}")
        print(sum(len(m) for _, _, m in made), "mutants")
        return
    os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", tempfile.mkdtemp(prefix="mutation-hypothesis-"))
    test_files = sorted({f for t in targets for f in t.tests if (ROOT / f).exists()})
    traced = {str(source_path(t.module)) for t in targets}
    work = Path(tempfile.mkdtemp(prefix="mutation-"))
    print(f"baseline: {', '.join(test_files)} (logs in {work})", flush=True)
    _preload(test_files)
    start = time.perf_counter()
    base = baseline(test_files, traced, work)
    failing = [t for t, o in base["outcomes"].items() if o != "passed" and o != "skipped"]
    print(
        f"baseline: {len(base['durations'])} tests in {base['seconds']:.0f} s; failing: {failing or 'none'}", flush=True
    )
    equivalent = load_equivalent()
    carried = {}
    if args.carry:
        carried = {
            m["id"]: m for m in json.loads(args.carry.read_text())["mutants"] if m["status"] in ("killed", "timeout")
        }
    jobs = []
    for t, tree, mutants in made:
        path = str(source_path(t.module))
        for m in mutants:
            if args.only and m.id not in args.only:
                continue
            if m.id in carried:
                m.status, m.killed_by, m.carried = carried[m.id]["status"], carried[m.id]["killed_by"], True
                continue
            if args.carry and m.id in equivalent:  # survived the --carry run, and cannot be killed
                m.status, m.carried = "survived", True
                continue
            tests = select(m, base, t, path)
            if not tests:
                m.status = "uncovered"
                continue
            budget = 3 * sum(base["durations"][x] for x in tests) + 30
            jobs.append((tree, m, tests, budget))
    print(f"{len(jobs)} mutants to run, {args.workers} at a time", flush=True)
    queue = list(jobs)
    lock = threading.Lock()
    finished = [0]

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                tree, m, tests, budget = queue.pop(0)
            run_mutant(tree, m, tests, budget, work)
            with lock:
                finished[0] += 1
                if m.status != "killed":
                    print(f"[{finished[0]}/{len(jobs)}] {m.status:8} {m.id} {m.module}:{m.line} {m.operator}: "
                          f"{m.before!r} -> {m.after!r}", flush=True)  # fmt: skip
                elif finished[0] % 25 == 0:
                    print(f"[{finished[0]}/{len(jobs)}] ...", flush=True)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for _, _, mutants in made:
        for m in mutants:
            if m.id in equivalent and m.status in ("survived", "uncovered"):
                m.reason = equivalent[m.id]
    write(made, base, time.perf_counter() - start, args)


def _score(mutants: list[Mutant]) -> dict[str, float | int]:
    counts = {s: sum(m.status == s for m in mutants) for s in ("killed", "timeout", "survived", "uncovered", "invalid")}
    equivalent = sum(m.reason is not None for m in mutants)
    real = len(mutants) - equivalent - counts["invalid"]
    caught = counts["killed"] + counts["timeout"]
    return {"mutants": len(mutants), **counts, "equivalent": equivalent,
            "score": round(caught / real, 4) if real else 1.0}  # fmt: skip


def write(made, base: dict, seconds: float, args: argparse.Namespace) -> None:
    mutants = [m for _, _, ms in made for m in ms if not args.only or m.id in args.only]
    by_target: dict[str, list[Mutant]] = {}
    for m in mutants:
        by_target.setdefault(m.target, []).append(m)
    scores = {k: _score(v) for k, v in by_target.items()}
    scores["all"] = _score(mutants)
    record = {"seconds": round(seconds), "workers": args.workers, "carried": sum(m.carried for m in mutants),
              "carried_from": str(args.carry) if args.carry else None, "baseline_seconds": round(base["seconds"]),
              "scores": scores, "command": " ".join(["python", "benchmarks/mutation.py", *sys.argv[1:]]),
              "mutants": [{k: v for k, v in asdict(m).items() if k != "path"} for m in mutants]}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(render(record))
    print(render(record).split("\n## ")[0])


def render(record: dict) -> str:
    lines = [f"# Mutation run: `{record['command']}`", "",
             f"{record['seconds']} s with {record['workers']} workers (baseline {record['baseline_seconds']} s). "
             "Score = (killed + timed out) / (mutants - equivalent - invalid)."
             + (f" {record['carried']} mutants were not run again: those killed in {record['carried_from']} "
                "(same id: the same change to the same code) count as killed, and the equivalent ones listed in "
                "benchmarks/mutation_equivalent.toml as survivors." if record.get("carried") else ""), "",
             "| target | mutants | killed | timeout | survived | uncovered | equivalent | score |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for key, s in record["scores"].items():
        lines.append(f"| {key} | {s['mutants']} | {s['killed']} | {s['timeout']} | {s['survived']} | "
                     f"{s['uncovered']} | {s['equivalent']} | {s['score']:.1%} |")  # fmt: skip
    alive = [m for m in record["mutants"] if m["status"] in ("survived", "uncovered")]
    for title, group in (("Surviving mutants", [m for m in alive if m["reason"] is None]),
                         ("Equivalent mutants (benchmarks/mutation_equivalent.toml)",
                          [m for m in alive if m["reason"] is not None])):  # fmt: skip
        lines += ["", f"## {title} ({len(group)})", ""]
        for m in group:
            where = f"{m['module']}:{m['line']} `{m['qualname']}`"
            change = f"`{m['before']}` -> `{m['after']}`".replace("\n", " ")
            lines.append(f"- {m['id']} ({m['status']}) {where} {m['operator']}: {change}"
                         + (f"  \n  {m['reason']}" if m["reason"] else ""))  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
