"""Run by the WebUI at start-up: installs only what its venv lacks, never torch or pinned packages."""

import launch

# The WebUI code path needs only these; torch, gradio and numpy always come with the host.
NEEDED = {"safetensors": "safetensors", "tqdm": "tqdm"}

for module, package in NEEDED.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {package}", f"{package} for sd-webui-loraclr")
