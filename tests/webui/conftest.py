"""Fixtures for tests that run our extension inside the A1111 v1.10.1 stand-in (tests/webui_harness).

``a1111`` (function scope) yields a started ``webui_harness.host.A1111Host``: harness on
sys.path (``import modules.shared``, ``import networks`` work), built-in Lora stand-in loaded
(Linear/Conv2d forward patched), tiny SD1 model in ``shared.sd_model`` with the class-level
sdp CrossAttention.forward. Teardown undoes the patches and removes ``modules``, ``networks``,
``k_diffusion``, ``ldm``... from sys.modules. Runs in the project venv and in an A1111-pinned
env (gradio 3.41.2, transformers 4.30.2); UI tests skip without gradio.

``forge`` (function scope) yields a started ``webui_harness.forge_host.ForgeHost`` (Forge
2.0.1v1.10.1 stand-in, see tests/webui_harness/forge); runs in the project venv and in
/work/envs/forge-pins (gradio 4.40.0, transformers 4.46.1).
"""
import os
import sys

import pytest

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_TESTS, os.path.dirname(_TESTS)):  # webui_harness / lora_fixtures, and lib_loraclr
    if _path not in sys.path:
        sys.path.insert(0, _path)

from webui_harness.host import A1111Host, gradio_available  # noqa: E402
from webui_harness.forge_host import ForgeHost  # noqa: E402


def _started(host):
    """Start a stand-in host for one test and always stop it (restoring sys.modules and globals)."""
    host.start()
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def a1111(tmp_path):
    yield from _started(A1111Host(str(tmp_path / "webui")))


@pytest.fixture
def a1111_sdxl(tmp_path):
    """The A1111 stand-in with a tiny SDXL-architecture model (sgm layout, two embedders)."""
    yield from _started(A1111Host(str(tmp_path / "webui"), arch="sdxl"))


@pytest.fixture
def forge(tmp_path):
    """A started ``webui_harness.forge_host.ForgeHost`` (Forge 2.0.1v1.10.1 stand-in): ``import modules_forge``,
    ``import backend...``, ``import networks`` (sd_forge_lora) work; ``shared.sd_model`` is the tiny
    ``StableDiffusion`` (weights are inference tensors). Teardown drops modules/backend/... from sys.modules."""
    yield from _started(ForgeHost(str(tmp_path / "forge")))


@pytest.fixture
def forge_sdxl(tmp_path):
    """The Forge stand-in with a tiny SDXL-architecture model (clip_l + clip_g, adm UNet)."""
    yield from _started(ForgeHost(str(tmp_path / "forge"), arch="sdxl"))


requires_gradio = pytest.mark.skipif(not gradio_available(), reason="gradio is not installed")
