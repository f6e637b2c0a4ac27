"""What the WebUI entry points (``scripts/``) share across hosts: the host interface, the merge
service behind the tab and the REST API, and the gradio UI builders (gradio 3.41 and 4.40).

Nothing here imports ``modules.*`` or gradio at import time.
"""
