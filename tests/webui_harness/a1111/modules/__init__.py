"""Stand-in for AUTOMATIC1111 v1.10.1's ``modules`` package (tests only)."""
