"""modules.prompt_parser (Forge): the A1111 stand-in's parser, with Forge's ``DictWithShape``.

Forge's modules/prompt_parser.py gives ``DictWithShape`` (the SDXL cond dict, {'crossattn',
'vector'}) ``to(...)`` and ``advanced_indexing(item)`` (every tensor value indexed by ``item``, a
new DictWithShape): backend.sampling.condition.compile_weighted_conditions selects the AND-slot
rows with it. The inherited functions look ``DictWithShape`` up in this module's globals, so
they build this class.
"""
from modules import _inherit

_inherit("prompt_parser", globals())

import torch  # noqa: E402

_A1111DictWithShape = DictWithShape  # noqa: F821


class DictWithShape(_A1111DictWithShape):
    def to(self, *args, **kwargs):
        for k in self.keys():
            if isinstance(self[k], torch.Tensor):
                self[k] = self[k].to(*args, **kwargs)
        return self

    def advanced_indexing(self, item):
        result = {}
        for k in self.keys():
            if isinstance(self[k], torch.Tensor):
                result[k] = self[k][item]
        return DictWithShape(result)
