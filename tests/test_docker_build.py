"""The GPU image's build without a Docker engine (docker/check_build.py): the Dockerfile's inputs,
the pinned stack it installs, and that its copied files alone start a stage. No network."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

DOCKER_DIR = Path(__file__).resolve().parents[1] / "docker"


@pytest.fixture
def check(monkeypatch):
    monkeypatch.syspath_prepend(str(DOCKER_DIR))
    return importlib.import_module("check_build")


def test_dockerfile_inputs_exist_and_runtime_folders_are_copied(check):
    assert check.image_problems(check.read_image()) == []


def test_gpu_pins_are_current_exact_and_cover_pyproject(check):
    assert check.pin_problems() == []


def test_gpu_pins_leave_out_the_container_and_add_the_kernels(check):
    pins = check.pins
    gpu = pins.read_pins(pins.GPU_CONSTRAINTS)
    cpu = pins.read_pins(pins.CPU_CONSTRAINTS)
    assert "torch" in cpu and "torch" not in gpu
    assert {k for k in cpu if k not in gpu} == {k for k in cpu if pins.container_provided(k)}
    assert {gpu[k][1] for k in ("mamba-ssm", "causal-conv1d")} == set(pins.SOURCE_BUILT.values())


def test_copied_tree_alone_composes_every_stage(check, tmp_path):
    done = check.stage_smoke(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stages composed" in done.stdout


def test_checks_catch_a_missing_input(check, tmp_path):
    text = check.DOCKERFILE.read_text()
    drop, typo = "COPY data_blends ./data_blends\n", "COPY requirements ./requirements"
    assert drop in text and typo in text
    broken = text.replace(drop, "").replace(typo, "COPY requirement ./requirements")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(broken)
    problems = check.image_problems(check.read_image(dockerfile))
    assert any("COPY source requirement does not exist" in p for p in problems)
    assert any("RUN needs requirements/constraints-gpu.txt" in p for p in problems)
    assert any(p.startswith("data_blends/stage0.yaml: a stage reads it") for p in problems)
    assert any("ENV OMNI_TRAIN_BLENDS" in p for p in problems)


def test_dockerignore_matches_like_docker(check, tmp_path):
    ignore_file = tmp_path / ".dockerignore"
    ignore_file.write_text(
        "runs\n**/__pycache__\n*.egg-info\nrecipes/**/*.yaml\n!recipes/config.yaml\n"
    )
    ignore = check.DockerIgnore(ignore_file)
    assert ignore.excluded("runs/x/y.pt")
    assert ignore.excluded("omni_train/data/__pycache__/a.pyc")
    assert ignore.excluded("omni_train.egg-info/PKG-INFO")
    assert ignore.excluded("recipes/stage/smoke.yaml")
    assert not ignore.excluded("recipes/config.yaml")
    assert not ignore.excluded("omni_train/data/assets/tiny_tokenizer/tokenizer.json")
