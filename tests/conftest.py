"""Shared pytest fixtures: tiny SD1 / SDXL models (session scope, built once per run).

The model fixtures are shared by every test of the session: do not change their weights in
place (build your own with ``lib_loraclr.tiny`` when a test must).
"""

import pytest

from lib_loraclr.hosts.diffusers import DiffusersModel, load_base
from lib_loraclr.tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_sd1_folder(tmp_path_factory) -> str:
    """A tiny SD1 diffusers folder written with seed 0."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "sd1"), "sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory) -> str:
    """A tiny SDXL diffusers folder written with seed 0."""
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "sdxl"), "sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sd1(tiny_sd1_folder) -> DiffusersModel:
    return load_base(tiny_sd1_folder)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_folder) -> DiffusersModel:
    return load_base(tiny_sdxl_folder)
