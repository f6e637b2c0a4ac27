"""Hosts: each implements ``lib_loraclr.model.ModelAccess`` for one way of loading SD models.

``diffusers`` (standalone and tests) imports diffusers; the WebUI hosts must not, so nothing
is imported here eagerly.
"""
