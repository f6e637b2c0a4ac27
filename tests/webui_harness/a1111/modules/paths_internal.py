import os

script_path = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
data_path = os.environ.get("A1111_HARNESS_DATA", script_path)
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
sd_configs_path = os.path.join(script_path, "configs")
sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
sd_model_file = os.path.join(script_path, "model.ckpt")
default_sd_model_file = sd_model_file


def normalized_filepath(filepath):
    return os.path.normpath(os.path.abspath(filepath))
