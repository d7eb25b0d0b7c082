"""Latency and memory of the runtime against the PyTorch FP32 eager baseline, measured in one run."""
