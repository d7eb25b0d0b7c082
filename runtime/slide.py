"""`python -m runtime.slide`: the entry point; the CLI is runtime/apps/slide.py, the slide pipeline runtime/slides/."""
from runtime.apps.slide import main

if __name__ == "__main__":
    raise SystemExit(main())
