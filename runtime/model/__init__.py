"""A model directory: its contract and manifest, the precisions it may hold, the fidelity gates, where models live; and
the model's input as the contract defines it: field geometry and CPU preprocessing."""
