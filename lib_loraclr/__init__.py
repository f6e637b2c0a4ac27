"""sd-webui-loraclr: merge concept LoRAs with LoRACLR and compose them with CLoRA."""

__version__ = "0.1.0"
