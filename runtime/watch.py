"""`python -m runtime.watch`: the entry point; the code is runtime/apps/watch.py."""
from runtime.apps.watch import main

if __name__ == "__main__":
    raise SystemExit(main())
