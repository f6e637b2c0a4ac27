"""Forge's ``modules`` package stand-in.

Forge keeps most of A1111's ``modules``; so does this harness: submodules that Forge changed
live here, every other ``modules.X`` falls back to the A1111 stand-in
(``tests/webui_harness/a1111/modules``) through ``__path__``. ``_inherit(name, namespace)``
executes an A1111 stand-in module's source in a Forge module's namespace so that module can
extend it (imports inside resolve to the Forge versions).
"""
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_A1111 = os.path.normpath(os.path.join(_HERE, "..", "..", "a1111", "modules"))
__path__ = [_HERE, _A1111]


def _inherit(name, namespace):
    path = os.path.join(_A1111, name + ".py")
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    exec(code, namespace)
