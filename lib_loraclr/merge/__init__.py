"""LoRACLR merge: feature capture, the per-layer objective and its solvers, the writer and the report."""
