"""The model on a Triton Inference Server through PyTriton, below its command (runtime/apps/triton_server.py):
starting, binding and stopping Triton (`server.py`) and what one run leaves on the machine and its removal however
the run ends (`workspace.py`). The client side is runtime/backends/triton.py; the repository for a stock
tritonserver is export/triton_repo.py."""
