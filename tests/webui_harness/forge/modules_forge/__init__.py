"""Stand-in for Forge's ``modules_forge`` package (``import modules_forge`` is how extensions detect Forge)."""
