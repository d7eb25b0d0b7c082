"""`python -m runtime.classify`: the entry point; the code is runtime/apps/classify.py."""
from runtime.apps.classify import main

if __name__ == "__main__":
    raise SystemExit(main())
