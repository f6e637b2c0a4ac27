"""modules_forge.main_entry: the checkpoint / module selection state (no UI in the harness)."""
from modules import shared, sd_models

forge_unet_storage_dtype_options = {'Automatic': (None, False)}
module_list = {}
ui_checkpoint = None
ui_vae = None
ui_clip_skip = None
ui_forge_preset = None


def refresh_models():
    return [info.title for info in sd_models.checkpoints_list.values()], list(module_list)


def refresh_model_loading_parameters():
    from modules.sd_models import select_checkpoint, model_data
    checkpoint_info = select_checkpoint()
    model_data.forge_loading_parameters = dict(checkpoint_info=checkpoint_info, additional_modules=shared.opts.forge_additional_modules,
                                               unet_storage_dtype=None, **{k: v for k, v in model_data.forge_loading_parameters.items()
                                                                          if k == 'harness_loader'})


def checkpoint_change(ckpt_name: str, save=True, refresh=True):
    if shared.opts.sd_model_checkpoint == ckpt_name:
        return False
    shared.opts.set('sd_model_checkpoint', ckpt_name)
    if refresh:
        refresh_model_loading_parameters()
    return True


def modules_change(module_values: list, save=True, refresh=True) -> bool:
    shared.opts.set('forge_additional_modules', list(module_values))
    if refresh:
        refresh_model_loading_parameters()
    return True
