"""`python -m runtime.cohort`: the entry point; the CLI is runtime/apps/cohort.py, the runner runtime/cohorts/."""
from runtime.apps.cohort import main

if __name__ == "__main__":
    raise SystemExit(main())
