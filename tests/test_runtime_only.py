"""A runtime-only install (`bash setup.sh --runtime-only`, issue 39) leaves out the optional extras: each one's absence
is said at run time with the extra that brings it, never as a traceback. The extras are hidden from the import
system here (a None in sys.modules makes `import X` fail as it does where X is not installed)."""
from __future__ import annotations

import runpy
import sys

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
