"""modules.shared_cmd_options: ``cmd_opts`` is an argparse.Namespace (tests may set any attribute)."""
import argparse
import os

from modules import paths_internal

parser = argparse.ArgumentParser()
parser.add_argument("--lora-dir", type=str, default=os.path.join(paths_internal.models_path, "Lora"))
parser.add_argument("--lyco-dir-backcompat", type=str, default=os.path.join(paths_internal.models_path, "LyCORIS"))
parser.add_argument("--embeddings-dir", type=str, default=os.path.join(paths_internal.data_path, "embeddings"))
parser.add_argument("--api", action="store_true")
parser.add_argument("--nowebui", action="store_true")
parser.add_argument("--skip-install", action="store_true")
parser.add_argument("--use-cpu", nargs="+", default=["all"])
parser.add_argument("--no-half", action="store_true", default=True)
parser.add_argument("--no-half-vae", action="store_true", default=True)
parser.add_argument("--listen", action="store_true")
parser.add_argument("--port", type=int, default=None)
parser.add_argument("--data-dir", type=str, default=paths_internal.data_path)
parser.add_argument("--ckpt-dir", type=str, default=None)
parser.add_argument("--freeze-settings", action="store_true")
parser.add_argument("--freeze-settings-in-sections", type=str, default=None)
parser.add_argument("--freeze-specific-settings", type=str, default=None)
parser.add_argument("--hide-ui-dir-config", action="store_true")
parser.add_argument("--no-prompt-history", action="store_true", default=True)
parser.add_argument("--disable-extension-access", action="store_true")
parser.add_argument("--ui-settings-file", type=str, default=os.path.join(paths_internal.data_path, "config.json"))
parser.add_argument("--styles-file", type=str, action="append", default=[])
parser.add_argument("--test-server", action="store_true")
parser.add_argument("--disable-opt-split-attention", action="store_true")
parser.add_argument("--opt-sdp-attention", action="store_true")
parser.add_argument("--xformers", action="store_true")
parser.add_argument("--lowvram", action="store_true")
parser.add_argument("--medvram", action="store_true")

cmd_opts = parser.parse_args([])
