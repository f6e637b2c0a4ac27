"""modules.shared (Forge): the A1111 stand-in's globals, Forge's hidden options, and ``sd_model``
as a module property over ``sd_models.model_data`` (like Forge's ``shared.Shared``)."""
import sys

from modules import _inherit

_inherit("shared", globals())

from modules_forge import shared_options as forge_shared_options  # noqa: E402

forge_shared_options.register(options_templates, options_section, OptionInfo)  # noqa: F821
opts = options.Options(options_templates, restricted_opts)  # noqa: F821

del sd_model  # noqa: F821


class Shared(sys.modules[__name__].__class__):
    @property
    def sd_model(self):
        import modules.sd_models
        return modules.sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        import modules.sd_models
        modules.sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = Shared
