"""What the WebUI entry points (``scripts/``) share across hosts: the merge service behind the
tab and the REST API, the composition script's state, and the gradio UI builders (gradio 3.41
and 4.40). The hosts themselves are in ``lib_loraclr.hosts``.

Nothing here imports ``modules.*`` or gradio at import time.
"""

from __future__ import annotations


def supported_host():
    """The running WebUI's host, or None (said on the console) for a fork we do not support."""
    from ..hosts.webui_host import UnsupportedWebUI, current_host

    try:
        return current_host()
    except UnsupportedWebUI as error:
        print(f"[LoRACLR] {error}: the extension is disabled")
        return None
