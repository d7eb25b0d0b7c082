"""A model directory: its contract and manifest, the precisions it may hold, the fidelity gates, where models live."""
