"""`python -m runtime.cohort`: the entry point; the code is runtime/apps/cohort.py."""
from runtime.apps.cohort import main

if __name__ == "__main__":
    raise SystemExit(main())
