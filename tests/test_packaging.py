"""The pins that keep installs from pulling the wrong torch: the Makefile, the Dockerfile and
pyproject agree (a bare `torch` or a Triton pulling its own would fetch multi-GB CUDA builds)."""
from __future__ import annotations

import re
from pathlib import Path

import tomllib

REPO = Path(__file__).parents[1]


def test_torch_is_pinned_alike_and_installed_first() -> None:
    make = re.search(r"^TORCH_VERSION := (\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    docker = (REPO / "deploy" / "Dockerfile").read_text()
    assert make and f"ARG TORCH_VERSION={make.group(1)}" in docker
    # torch before flash-attn (built against it) and before the package's own dependencies.
    torch_at = docker.index('pip install "torch==${TORCH_VERSION}"')
    assert torch_at < docker.index('"flash-attn>=2.6"') < docker.index('pip install ".[serve]"')


def test_triton_is_an_exact_test_dependency() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (pin,) = extras["triton"]
    assert re.fullmatch(r"triton==\d+\.\d+\.\d+; platform_system == 'Linux'", pin)
    assert "fluidserve[triton]" in extras["test"]
    assert not any(d.split(";")[0].strip() == "torch" for deps in extras.values() for d in deps)
