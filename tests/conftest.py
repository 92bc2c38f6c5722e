"""Shared fixtures: tiny model folders written once per session by `make-tiny`."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ("wan", "wan2.2", "wan2.2-ti2v", "hunyuanvideo")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder(family) -> path of a diffusers folder written by `unison make-tiny`."""
    from unison.launch.cli import main

    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            assert main(["make-tiny", "--family", family, "--out", str(out)]) == 0
            made[family] = str(out)
        return made[family]

    return get
