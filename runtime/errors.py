"""One error base and one mapping from errors to the documented exit codes, the same in every CLI.

Exit status everywhere: 0 done; 1 some inputs failed or a check failed (everything else still reported);
2 usage error, unusable model, or something this machine lacks.
"""
from __future__ import annotations

import sys

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2


class BreakhisError(Exception):
    """Every error raised on purpose here; the message names the file or thing and the reason."""

    exit_code = EXIT_UNUSABLE


class Unavailable(BreakhisError):
    """This machine lacks something (a GPU, pycuda, nvcc, TensorRT, a backend): automatic choices fall back."""


class CheckFailed(BreakhisError):
    """A fidelity or parity check failed: what it gated was not written."""

    exit_code = EXIT_FAILED


def report(e: BreakhisError) -> int:
    """Print the error for people and return its exit code."""
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
