"""modules_forge.shared: Forge-side globals (no argument parsing in the harness)."""
import os

from modules.paths import models_path

controlnet_dir = os.path.join(models_path, 'ControlNet')
diffusers_dir = os.path.join(models_path, 'diffusers')
supported_preprocessors = {}
supported_control_models = []


def add_supported_preprocessor(preprocessor):
    supported_preprocessors[preprocessor.name] = preprocessor


def add_supported_control_model(control_model):
    supported_control_models.append(control_model)
