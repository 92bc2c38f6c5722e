"""Shared fixtures: tiny model folders written once per session by `make-tiny`."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder(family, dtype="float32") -> path of a diffusers folder written by `unison make-tiny`."""
    from unison.launch.cli import main

    made: dict[tuple[str, str], str] = {}

    def get(family: str, dtype: str = "float32") -> str:
        if (family, dtype) not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}-{dtype}")
            assert main(["make-tiny", "--family", family, "--out", str(out), "--dtype", dtype]) == 0
            made[family, dtype] = str(out)
        return made[family, dtype]

    return get


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests need a CUDA GPU: skipped here (CI never has one), run by
    `pytest -m gpu` and benchmarks/gpu_suite.py on a GPU machine."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (pytest -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
