"""The GPU image's build, checked as far as a machine without a Docker engine allows.

python docker/check_build.py [--resolve] [--build] [--index-url URL]

Always (no network; tests/test_docker_build.py runs the same checks): every COPY source exists and
survives .dockerignore; every repository file a RUN line or an ENV path names is in the image by
then; every runtime folder of a stage is copied whole; constraints-gpu.txt is up to date with
constraints-cpu.txt, holds only exact pins, none of what the container provides, and one for every
runtime requirement of pyproject.toml that satisfies it; and the copied tree, on its own, composes
every stage recipe and reads every blend.

--resolve (network, about a minute): every pin exists on the index for the image's interpreter
(CPython 3.12, manylinux x86_64), the source-built ones as source distributions.
--build: `docker build` where `docker info` finds an engine; otherwise says it did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pins
from packaging.requirements import Requirement

ROOT = pins.ROOT
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
# What a stage reads besides the installed package: the image must hold each of these whole.
RUNTIME_DIRS = ("omni_train", "recipes", "data_blends", "launchers", "benchmarks")
# Repository files a script that runs in the build reads, beyond what its command line names.
SCRIPT_INPUTS = {
    "docker/pins.py": ("requirements/constraints-gpu.txt", "pyproject.toml"),
}
IMAGE_PYTHON = "3.12"  # nvcr.io/nvidia/pytorch:25.09-py3 is Ubuntu 24.04 with its Python
IMAGE_GLIBC_MINOR = 39  # Ubuntu 24.04: glibc 2.39, so manylinux_2_17 ... manylinux_2_39 wheels
PUBLIC_INDEX = "https://pypi.org/simple"
_PATH_TOKEN = re.compile(r"^[\w.-]+(/[\w.-]+)+/?$|^[\w-]+\.(py|sh|txt|toml|yaml|md)$")


@dataclass
class Image:
    """What the Dockerfile puts in the image, in order: image path -> repository path."""

    workdir: PurePosixPath = PurePosixPath("/")
    files: dict[PurePosixPath, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def has(self, path: PurePosixPath) -> bool:
        return path in self.files or any(path in f.parents for f in self.files)


def instructions(text: str) -> list[tuple[int, str, str]]:
    """(line, KEYWORD, arguments) with continuation lines joined and comment lines dropped."""
    out: list[tuple[int, str, str]] = []
    parts: list[str] = []
    start = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not line and not parts):
            continue
        if not parts:
            start = lineno
        if line.endswith("\\"):
            parts.append(line[:-1].strip())
            continue
        parts.append(line)
        keyword, _, args = " ".join(p for p in parts if p).partition(" ")
        out.append((start, keyword.upper(), args.strip()))
        parts = []
    return out


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        else:
            c = pattern[i]
            out += "[^/]*" if c == "*" else "[^/]" if c == "?" else re.escape(c)
            i += 1
    return re.compile(out)


class DockerIgnore:
    """.dockerignore as Docker reads it: paths from the context root, later lines win, `!`
    re-includes, and an excluded folder excludes everything in it."""

    def __init__(self, path: Path | None = DOCKERIGNORE):
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        if path is not None and path.is_file():
            for raw in path.read_text().splitlines():
                line = raw.strip()
                if not line or line.startswith("#"):
                    continue
                keep = line.startswith("!")
                pattern = line.lstrip("!").strip().strip("/")
                pattern = os.path.normpath(pattern).replace(os.sep, "/")
                self.rules.append((keep, _glob_regex(pattern)))

    def excluded(self, rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for keep, rx in self.rules:
            if any(rx.fullmatch(c) for c in candidates):
                result = not keep
        return result


def context_files(src: Path, ignore: DockerIgnore) -> list[Path]:
    if src.is_file():
        return [] if ignore.excluded(src.relative_to(ROOT).as_posix()) else [src]
    files = []
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not ignore.excluded((here / d).relative_to(ROOT).as_posix())
        )
        for name in sorted(filenames):
            f = here / name
            if not ignore.excluded(f.relative_to(ROOT).as_posix()):
                files.append(f)
    return files


def _env_pairs(args: str) -> dict[str, str]:
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:  # legacy `ENV KEY value`
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) for t in tokens)


def _copy(image: Image, lineno: int, args: str, ignore: DockerIgnore) -> None:
    tokens = shlex.split(args)
    if any(t.startswith("--from") for t in tokens):
        return  # from another stage, not the build context
    *sources, dest = [t for t in tokens if not t.startswith("--")]
    dest_path = image.workdir / dest
    into_dir = dest.endswith("/") or len(sources) > 1
    for src in sources:
        repo = (ROOT / src).resolve()
        if not repo.is_relative_to(ROOT) or not repo.exists():
            image.problems.append(f"Dockerfile:{lineno}: COPY source {src} does not exist")
            continue
        files = context_files(repo, ignore)
        if not files:
            image.problems.append(
                f"Dockerfile:{lineno}: COPY source {src} is empty or excluded by .dockerignore"
            )
        for f in files:
            if repo.is_dir():
                target = dest_path / f.relative_to(repo).as_posix()
            else:
                target = dest_path / f.name if into_dir else dest_path
            image.files[PurePosixPath(os.path.normpath(target))] = f


def _run(image: Image, lineno: int, args: str) -> None:
    needed: list[str] = []
    for token in shlex.split(args.replace("&&", " ").replace(";", " ")):
        if "=" in token or token.startswith("-"):
            continue
        if _PATH_TOKEN.match(token) or token.startswith(str(image.workdir) + "/"):
            needed.append(token)
            needed += SCRIPT_INPUTS.get(token, ())
    if re.search(r"(^|\s)-e\s+\.(\s|$)", args):  # the project itself, editable
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        needed += ["pyproject.toml", project["readme"], "omni_train"]
    for token in needed:
        path = PurePosixPath(os.path.normpath(image.workdir / token))
        if not path.is_relative_to(image.workdir):
            continue  # made by the build or the base image, e.g. /etc/omni-train
        if not image.has(path):
            image.problems.append(f"Dockerfile:{lineno}: RUN needs {token}, not in the image yet")


def read_image(dockerfile: Path = DOCKERFILE) -> Image:
    image = Image()
    ignore = DockerIgnore()
    for lineno, keyword, args in instructions(dockerfile.read_text()):
        if keyword == "WORKDIR":
            image.workdir = image.workdir / args
        elif keyword in ("COPY", "ADD"):
            _copy(image, lineno, args, ignore)
        elif keyword == "RUN":
            _run(image, lineno, args)
        elif keyword == "ENV":
            for key, value in _env_pairs(args).items():
                image.env[key] = value
                path = PurePosixPath(value)
                if path.is_relative_to(image.workdir) and not image.has(path):
                    image.problems.append(f"Dockerfile:{lineno}: ENV {key}={value}: not in image")
    return image


def image_problems(image: Image) -> list[str]:
    problems = list(image.problems)
    in_image = set(image.files.values())
    ignore = DockerIgnore()
    for name in RUNTIME_DIRS:
        for f in context_files(ROOT / name, DockerIgnore(None)):  # the checkout, all of it
            if f.suffix == ".pyc" or "__pycache__" in f.parts:
                continue
            if f not in in_image:
                why = (
                    "excluded by .dockerignore"
                    if ignore.excluded(f.relative_to(ROOT).as_posix())
                    else "not copied"
                )
                problems.append(f"{f.relative_to(ROOT)}: a stage reads it at run time; {why}")
    return problems


def pin_problems() -> list[str]:
    problems = []
    if pins.GPU_CONSTRAINTS.read_text() != pins.gpu_constraints_text():
        problems.append("requirements/constraints-gpu.txt is out of date: run `make lock-gpu`")
    try:
        gpu = pins.read_pins(pins.GPU_CONSTRAINTS)
    except ValueError as e:
        return [*problems, str(e)]
    for key, (name, _) in gpu.items():
        if pins.container_provided(key):
            problems.append(f"constraints-gpu.txt pins {name}, which the container provides")
    extras = ["audio", "gpu"]
    for req in map(Requirement, pins.runtime_requirements(extras)):
        key = pins.canonical(req.name)
        if pins.container_provided(key):
            continue
        if key not in gpu:
            problems.append(f"{req} (pyproject.toml) has no pin in constraints-gpu.txt")
        elif not req.specifier.contains(gpu[key][1], prereleases=True):
            problems.append(f"{req} (pyproject.toml) is not met by the pin {key}=={gpu[key][1]}")
    return problems


def static_problems() -> list[str]:
    return image_problems(read_image()) + pin_problems()


def materialize(dest: Path, image: Image | None = None) -> Path:
    """The image's copied files under dest (an image path /a/b lands at dest/a/b); returns the
    workdir's place there."""
    image = image or read_image()
    for path, src in image.files.items():
        target = dest / path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest / image.workdir.relative_to("/")


_SMOKE = """
import sys
from pathlib import Path
import omni_train
root = Path(sys.argv[1]).resolve()
assert Path(omni_train.__file__).resolve().is_relative_to(root), omni_train.__file__
from omni_train.config.blends import available_blends, blend_variables
from omni_train.config.compose import available, compose_job
from omni_train.data.tokenizer import TINY_DIR
stages = available("stage")
for stage in stages:
    compose_job([f"stage={stage}"])
blends = available_blends()
for blend in blends:
    blend_variables(blend)
assert (TINY_DIR / "tokenizer.json").is_file(), TINY_DIR
print(f"{len(stages)} stages composed, {len(blends)} blends read, from {root}")
"""


def stage_smoke(dest: Path) -> subprocess.CompletedProcess[str]:
    """Compose every stage and read every blend with only the image's files on the path and its
    ENV (paths moved under dest): the copied tree holds what a stage needs to start."""
    image = read_image()
    workdir = materialize(dest, image)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNI_TRAIN_")}
    for key, value in image.env.items():
        env[key] = str(dest / value.lstrip("/")) if value.startswith("/") else value
    env["PYTHONPATH"] = str(workdir)
    # Outside the repository, so the checkout on the current path cannot stand in for the copy.
    return subprocess.run(
        [sys.executable, "-c", _SMOKE, str(workdir)],
        cwd=dest,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _platforms(arch: str) -> list[str]:
    # pip before 23.3 takes --platform literally; the image accepts every older manylinux too.
    tags = [f"manylinux_2_{m}_{arch}" for m in range(IMAGE_GLIBC_MINOR, 16, -1)]
    return [*tags, f"manylinux2014_{arch}", f"linux_{arch}"]


def _sdist_exists(index_url: str, name: str, version: str) -> bool:
    request = urllib.request.Request(
        f"{index_url.rstrip('/')}/{pins.canonical(name)}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}".lower()
    return any(f["filename"].lower() in (f"{stem}.tar.gz", f"{stem}.zip") for f in files)


def resolve_problems(index_url: str = PUBLIC_INDEX, arch: str = "x86_64") -> list[str]:
    """Every pin of constraints-gpu.txt found on the index for the image's interpreter: wheels
    (or a source distribution where a package has no wheel), without installing anything."""
    gpu = pins.read_pins(pins.GPU_CONSTRAINTS)
    source_built = {pins.canonical(n) for n in pins.SOURCE_BUILT}
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        reqs = Path(tmp) / "pins.txt"
        reqs.write_text(
            "".join(f"{n}=={v}\n" for k, (n, v) in gpu.items() if k not in source_built)
        )
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check"]
        cmd += ["install", "--dry-run", "-q"]
        cmd += ["--ignore-installed", "--no-deps", "--prefer-binary", "--index-url", index_url]
        cmd += ["--python-version", IMAGE_PYTHON, "--implementation", "cp"]
        for abi in (f"cp{IMAGE_PYTHON.replace('.', '')}", "abi3", "none"):
            cmd += ["--abi", abi]
        for platform in _platforms(arch):
            cmd += ["--platform", platform]
        cmd += ["--target", str(Path(tmp) / "target"), "--report", str(report), "-r", str(reqs)]
        # --isolated: the image's pip has none of this machine's pip configuration.
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            return [f"the pins do not resolve for CPython {IMAGE_PYTHON} {arch}:\n{tail}"]
        got = {
            pins.canonical(i["metadata"]["name"]): i
            for i in json.loads(report.read_text())["install"]
        }
    sdist_pins = 0
    for key, (name, version) in gpu.items():
        if key in source_built:
            if _sdist_exists(index_url, name, version):
                sdist_pins += 1
            else:
                problems.append(f"{name}=={version}: no source distribution on {index_url}")
        elif key not in got or got[key]["metadata"]["version"] != version:
            problems.append(f"{name}=={version}: not what pip found on {index_url}")
    sdists = sorted(
        i["metadata"]["name"]
        for i in got.values()
        if not i["download_info"]["url"].endswith(".whl")
    )
    print(
        f"resolve: {len(got)} wheels/sdists for CPython {IMAGE_PYTHON} {arch} on {index_url} "
        f"(built from source in the image: {', '.join(sdists) or 'none'}), "
        f"{sdist_pins} of {len(source_built)} source-built pins present as sdists"
    )
    return problems


def docker_build(tag: str) -> int | None:
    """None when no Docker engine answers (the client alone cannot build)."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    if subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        return None
    return subprocess.run([docker, "build", "-f", str(DOCKERFILE), "-t", tag, str(ROOT)]).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolve", action="store_true", help="check the pins on the index")
    parser.add_argument("--index-url", default=PUBLIC_INDEX)
    parser.add_argument("--arch", default="x86_64", choices=["x86_64", "aarch64"])
    parser.add_argument("--build", action="store_true", help="docker build where possible")
    parser.add_argument("--tag", default="omni-train:gpu")
    args = parser.parse_args(argv)

    problems = static_problems()
    print(f"static: {len(read_image().files)} files in the image, {len(problems)} problems")
    with tempfile.TemporaryDirectory() as tmp:
        smoke = stage_smoke(Path(tmp))
    if smoke.returncode != 0:
        problems.append(f"the copied tree does not start a stage:\n{smoke.stderr[-2000:]}")
    else:
        print(f"smoke: {smoke.stdout.strip()}")
    if args.resolve:
        problems += resolve_problems(args.index_url, args.arch)
    if args.build:
        rc = docker_build(args.tag)
        if rc is None:
            print("build: not run, no Docker engine answers `docker info` here")
        elif rc != 0:
            problems.append(f"docker build failed (exit {rc})")
        else:
            print(f"build: {args.tag} built")
    for p in problems:
        print(f"problem: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
