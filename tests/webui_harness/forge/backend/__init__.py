"""Stand-in for Forge's ``backend`` package (commit dfdcbab): the parts an SD1 txt2img touches."""
