"""`python -m runtime.serve`: the entry point; the code is runtime/apps/serve.py."""
from runtime.apps.serve import main

if __name__ == "__main__":
    raise SystemExit(main())
