"""`python -m runtime.slide`: the entry point; the code is runtime/apps/slide.py."""
from runtime.apps.slide import main

if __name__ == "__main__":
    raise SystemExit(main())
