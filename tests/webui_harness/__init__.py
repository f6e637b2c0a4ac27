"""Test stand-ins for AUTOMATIC1111 v1.10.1 (no WebUI install needed).

- ``ldm_tiny``: a tiny SD1-architecture model in ldm/CompVis naming (no diffusers).
- ``a1111/``: put this folder on ``sys.path`` and ``import modules.shared`` etc. resolve to
  small stand-ins that follow the real signatures and call order.
- ``a1111/extensions-builtin/Lora``: the built-in Lora stand-in (``import networks``).
- ``host``: helpers used by the pytest fixture (``tests/webui/conftest.py``).
"""
