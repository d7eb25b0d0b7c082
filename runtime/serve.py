"""`python -m runtime.serve`: the entry point; the code is runtime/apps/serve.py (the serve extra: FastAPI, uvicorn)."""
import sys

try:
    from runtime.apps.serve import main
except ImportError as e:  # an optional extra: bash setup.sh installs it, setup.sh --runtime-only does not
    if e.name not in ("fastapi", "starlette"):
        raise
    print(f"error: the web page and HTTP API need the serve extra, which is not installed here ({e}): pip install "
          "-e '.[serve]'", file=sys.stderr)
    raise SystemExit(2) from None

if __name__ == "__main__":
    raise SystemExit(main())
