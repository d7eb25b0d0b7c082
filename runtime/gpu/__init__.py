"""The GPU side: the one CUDA context owner, the preprocessing kernel (sources, ABI, build) and its runner."""
