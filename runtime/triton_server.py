"""`python -m runtime.triton_server`: the entry point; the code is runtime/apps/triton_server.py."""
from runtime.apps.triton_server import main

if __name__ == "__main__":
    raise SystemExit(main())
