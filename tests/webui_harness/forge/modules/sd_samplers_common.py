"""modules.sd_samplers_common (Forge): decoding goes through ``sd_model.decode_first_stage`` (the
Forge VAE patcher); there is no ``first_stage_model``."""
import types

from modules import _inherit

_inherit("sd_samplers_common", globals())


def samples_to_images_tensor(sample, approximation=None, model=None):
    if model is None:
        model = shared.sd_model  # noqa: F821
    return model.decode_first_stage(sample)


def decode_first_stage(model, x):
    return samples_to_images_tensor(x, 0, model)


def images_tensor_to_samples(image, approximation=None, model=None):
    if model is None:
        model = shared.sd_model  # noqa: F821
    image = image.to(shared.device, dtype=torch.float32) * 2 - 1  # noqa: F821
    return model.get_first_stage_encoding(model.encode_first_stage(image))


_a1111_sampler_init = Sampler.__init__  # noqa: F821


def _sampler_init(self, funcname):
    model = shared.sd_model  # noqa: F821
    shared.sd_model = types.SimpleNamespace(model=None)  # noqa: F821
    try:
        _a1111_sampler_init(self, funcname)
    finally:
        shared.sd_model = model  # noqa: F821
    self.conditioning_key = 'crossattn'  # Forge: always 'crossattn'


Sampler.__init__ = _sampler_init  # noqa: F821
