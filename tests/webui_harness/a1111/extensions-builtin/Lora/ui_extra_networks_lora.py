"""Built-in Lora stand-in: ui_extra_networks_lora.py, only the Lora tab's item listing.

``ExtraNetworksPageLora.create_item`` keeps the real version filter: unless ``opts.lora_show_all``,
a network whose sd_version (from ``ss_base_model_version`` / ``ss_v2`` metadata, or the user
metadata's "sd version") differs from the loaded model's is left out (``None``); an Unknown-version
network is left out only when the model's version is listed in ``lora_hide_unknown_for_versions``.
Not simulated: the gradio page (ui_extra_networks.ExtraNetworksPage), previews, descriptions,
user-metadata json files (``user_metadata`` is always empty here).
"""
import os

import network
import networks
from modules import shared


class ExtraNetworksPageLora:
    def __init__(self):
        self.name = 'lora'
        self.allow_negative_prompt = True

    def refresh(self):
        networks.list_available_networks()

    def create_item(self, name, index=None, enable_filter=True):
        lora_on_disk = networks.available_networks.get(name)
        if lora_on_disk is None:
            return

        path, ext = os.path.splitext(lora_on_disk.filename)
        alias = lora_on_disk.get_alias()
        item = {
            "name": name,
            "filename": lora_on_disk.filename,
            "shorthash": lora_on_disk.shorthash,
            "search_terms": [path + ext] + ([lora_on_disk.hash] if lora_on_disk.hash else []),
            "local_preview": f"{path}.preview.png",
            "metadata": lora_on_disk.metadata,
            "sort_keys": {'default': index, 'name': name.lower()},
            "sd_version": lora_on_disk.sd_version.name,
            "user_metadata": {},
            "prompt": f"<lora:{alias}:" + str(shared.opts.extra_networks_default_multiplier) + ">",
        }

        sd_version = item["user_metadata"].get("sd version")
        if sd_version in network.SdVersion.__members__:
            item["sd_version"] = sd_version
            sd_version = network.SdVersion[sd_version]
        else:
            sd_version = lora_on_disk.sd_version

        if shared.opts.lora_show_all or not enable_filter or not shared.sd_model:
            pass
        elif sd_version == network.SdVersion.Unknown:
            model_version = network.SdVersion.SDXL if shared.sd_model.is_sdxl else network.SdVersion.SD2 if shared.sd_model.is_sd2 else network.SdVersion.SD1
            if model_version.name in shared.opts.lora_hide_unknown_for_versions:
                return None
        elif shared.sd_model.is_sdxl and sd_version != network.SdVersion.SDXL:
            return None
        elif shared.sd_model.is_sd2 and sd_version != network.SdVersion.SD2:
            return None
        elif shared.sd_model.is_sd1 and sd_version != network.SdVersion.SD1:
            return None

        return item

    def list_items(self):
        # instantiate a list to protect against concurrent modification
        names = list(networks.available_networks)
        for index, name in enumerate(names):
            item = self.create_item(name, index)
            if item is not None:
                yield item
