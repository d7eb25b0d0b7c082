"""A runtime-only install (`bash setup.sh --runtime-only`, issue 39) leaves out the optional extras: each one's absence
is said at run time with the extra that brings it, never as a traceback. The extras are hidden from the import
system here (a None in sys.modules makes `import X` fail as it does where X is not installed)."""
from __future__ import annotations

import runpy
import sys
from typing import Any

import pytest


def test_serve_without_its_extra_says_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)
    for name in ("runtime.serve", "runtime.apps.serve"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(SystemExit) as e:
        runpy.run_module("runtime.serve", run_name="__main__")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "the web page and HTTP API need the serve extra" in err and "pip install -e '.[serve]'" in err


def test_openvino_without_its_extra_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.backends import openvino

    monkeypatch.setitem(sys.modules, "openvino", None)
    openvino.cpu_capabilities.cache_clear()  # a real OpenVINO's answer may be cached from another test
    try:
        ok, why = openvino.native("bf16")
    finally:
        openvino.cpu_capabilities.cache_clear()
    assert not ok
    assert "OpenVINO is not installed" in why and "pip install -e '.[openvino]'" in why
    assert "setup.sh --runtime-only does not" in why


def _result(p: float, label: str = "Malignant", error: str | None = None) -> dict[str, Any]:
    return {"path": "/x/a.png", "label": label, "probability": p, "error": error,
            "fields": [{"row": 0, "col": 0, "label": label, "probability": p}]}


def test_arm64_check_compares_every_probability_and_label_within_the_fp32_bound() -> None:
    from benchmarks.arm64_check import compare
    from runtime.model.precisions import PRECISIONS

    tol = PRECISIONS["fp32"].tolerance
    assert tol.probability is not None
    p = 0.9
    bound = tol.probability + tol.rtol * p
    lines, worst = compare([_result(p)], [_result(p)])
    assert worst == 0 and len(lines) == 2 and all(line.startswith("ok") for line in lines)  # the image and its field
    lines, worst = compare([_result(p)], [_result(p + bound / 2)])
    assert 0.49 < worst < 0.51 and all(line.startswith("ok") for line in lines)
    lines, worst = compare([_result(p)], [_result(p + 2 * bound)])
    assert 1.99 < worst < 2.01 and all(line.startswith("FAIL") for line in lines)
    lines, worst = compare([_result(0.5)], [_result(0.5, "Benign")])  # a label flip fails even at |d p| = 0
    assert worst == float("inf") and all(line.startswith("FAIL") for line in lines)
    lines, worst = compare([_result(p)], [_result(p, error="decode failed")])
    assert worst == float("inf") and "decode failed" in lines[0]
    assert compare([_result(p)], [])[1] == float("inf")
