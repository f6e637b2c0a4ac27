"""Forge's k_diffusion stand-in: ``external`` adds ForgeScheduleLinker; ``sampling`` / ``utils`` are the A1111 stand-in's."""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_A1111 = os.path.normpath(os.path.join(_HERE, "..", "..", "a1111", "k_diffusion"))
__path__ = [_HERE, _A1111]

from . import sampling, utils  # noqa: E402,F401
