from modules.paths_internal import models_path, script_path, data_path, extensions_dir, extensions_builtin_dir, sd_configs_path  # noqa: F401
