"""python -m runtime.classify as a user runs it: table, JSON, exit codes, and every bad input from the issue."""
from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from runtime.model.manifest import sha256_file
from tests.conftest import run_module


def classify(*args):
    return run_module("runtime.classify", "--no-progress", *args)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, images_100x):
    d = tmp_path_factory.mktemp("inputs")
    good = images_100x[0]
    (d / "zero.png").write_bytes(b"")
    data = good.read_bytes()
    (d / "truncated.png").write_bytes(data[:5000])
    (d / "text.png").write_text("hello, I am not an image\n")
    cv2.imwrite(str(d / "small.png"), np.zeros((300, 400, 3), np.uint8))
    return d


def test_table_for_people(model_dir, images_100x):
    proc = classify(str(images_100x[0]), "--model", str(model_dir))
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stdout and "NOT a diagnosis" in proc.stdout
    assert images_100x[0].name in proc.stdout and "1 classified (0 flagged by the quality check, 0 with warnings), " \
        "0 failed" in proc.stdout


def test_stdout_holds_results_and_stderr_notes_and_errors(model_dir, images_100x, tmp_path):
    """The table's stdout: the model line, the rows, the summary and the model's standing; how the backend was
    chosen only with -v, on stderr; why an image has no verdict on stderr, in words."""
    missing = tmp_path / "missing.png"
    proc = classify(str(images_100x[0]), str(missing), "--model", str(model_dir), "--backend", "cpu",
                    "--precision", "fp16")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("model: ") and "precision fp16" in lines[0] and lines[-1].startswith("UNTRAINED")
    assert not any(line.startswith(("note:", "re-check:", "error:")) for line in lines)
    assert "missing.png" in next(line for line in lines if line.startswith("missing.png")) and "ERROR" in proc.stdout
    assert f"error: {missing}: file not found" in proc.stderr and "re-check:" not in proc.stderr
    proc = classify(str(images_100x[0]), "--model", str(model_dir), "--backend", "cpu", "--precision", "fp16", "-v")
    assert proc.returncode == 0 and "re-check: fields with a probability within" in proc.stderr
    assert "re-check:" not in proc.stdout


def test_json_schema(model_dir, images_100x):
    proc = classify(str(images_100x[0]), str(images_100x[-1]), "--model", str(model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out) == 2
    for r in out:
        assert set(r) >= {"path", "label", "probability", "fields", "timings_ms", "model", "error"}
        assert r["error"] is None and r["label"] in ("Benign", "Malignant")
        # the CPU tier: BF16 where this CPU has it and the model's variant passed (tests/test_cpu_tier.py), else FP32
        assert r["model"]["trained"] is False and r["model"]["backend"] in ("onnxruntime-cpu-fp32",
                                                                             "openvino-cpu-bf16")
        assert r["fields"] == [{**r["fields"][0], "row": 0, "col": 0, "y": 0, "x": 0, "patches": 6}]
        assert (r["probability"] > 0.5) == (r["label"] == "Malignant")
        assert {"decode", "preprocess", "inference", "total"} <= set(r["timings_ms"])


def test_bad_inputs_are_reported_and_others_still_classified(model_dir, images_100x, bad_inputs):
    args = [str(images_100x[0]), *(str(bad_inputs / n) for n in ("zero.png", "truncated.png", "text.png",
                                                                   "small.png")), str(bad_inputs / "missing.png")]
    proc = classify(*args, "--model", str(model_dir), "--json")
    assert proc.returncode == 1
    out = {r["path"]: r for r in json.loads(proc.stdout)}
    assert out[str(images_100x[0])]["error"] is None
    reasons = {"zero.png": "empty file", "truncated.png": "truncated or corrupt",
               "text.png": "not a PNG, JPEG, TIFF or BMP", "small.png": "at least 672x448",
               "missing.png": "file not found"}
    for name, reason in reasons.items():
        err = out[str(bad_inputs / name)]["error"]
        assert reason in err and name in err


def test_folder_glob_and_empty_folder(model_dir, images_100x, tmp_path):
    for p in images_100x[:2]:
        shutil.copy(p, tmp_path)
    (tmp_path / "empty").mkdir()
    proc = classify(str(tmp_path), str(tmp_path / "*.png"), str(tmp_path / "empty"), str(tmp_path / "*.jpg"),
                    "--model", str(model_dir), "--json")
    out = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert [r["error"] is None for r in out] == [True, True, True, True, False, False]
    assert "directory contains no images" in out[4]["error"] and "pattern matches no files" in out[5]["error"]


def test_conversions_are_reported(model_dir, images_100x, tmp_path):
    img = cv2.imread(str(images_100x[0]))
    cv2.imwrite(str(tmp_path / "gray.png"), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
    cv2.imwrite(str(tmp_path / "deep.png"), img.astype(np.uint16) * 257)
    proc = classify(str(tmp_path / "gray.png"), str(tmp_path / "deep.png"), "--model", str(model_dir), "--json")
    assert proc.returncode == 0, proc.stderr
    gray, deep = json.loads(proc.stdout)
    assert gray["conversions"] == ["grayscale -> BGR (channel replicated)"]
    assert deep["conversions"] == ["16-bit -> 8-bit (value / 257, rounded)"]


def test_usage_errors_exit_2(model_dir):
    assert classify().returncode == 2
    proc = classify("x.png", "--batch-size", "0", "--model", str(model_dir))
    assert proc.returncode == 2 and "--batch-size" in proc.stderr


def test_missing_model(tmp_path, images_100x):
    proc = classify(str(images_100x[0]), "--model", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "manifest not found" in proc.stderr and "--model" in proc.stderr


@pytest.fixture
def model_copy(model_dir, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    for f in ("manifest.json", "model.onnx", "stain_reference.json"):  # what an fp32 run reads
        shutil.copy(model_dir / f, d)
    return d


def test_corrupt_model_file(model_copy, images_100x):
    (model_copy / "model.onnx").write_bytes(b"\x00" * 100)
    m = json.loads((model_copy / "manifest.json").read_text())
    m["files"]["model.onnx"] = sha256_file(model_copy / "model.onnx")  # listed as such: ONNX Runtime must refuse it
    (model_copy / "manifest.json").write_text(json.dumps(m))
    proc = classify(str(images_100x[0]), "--model", str(model_copy))
    assert proc.returncode == 2 and "model.onnx" in proc.stderr and "cannot load" in proc.stderr


def test_a_swapped_model_file_is_refused_and_what_ran_is_reported(model_dir, model_copy, images_100x):
    proc = classify(str(images_100x[0]), "--model", str(model_copy), "--json")
    info = json.loads(proc.stdout)[0]["model"]
    assert info["file"] == "model.onnx" and info["file_sha256"] == sha256_file(model_dir / "model.onnx")
    shutil.copy(model_dir / "model.fp16.onnx", model_copy / "model.onnx")  # runs, but is not what was exported
    proc = classify(str(images_100x[0]), "--model", str(model_copy))
    assert proc.returncode == 2 and "model.onnx" in proc.stderr and "does not match manifest.json" in proc.stderr


def test_manifest_that_does_not_match_the_onnx(model_copy, images_100x):
    m = json.loads((model_copy / "manifest.json").read_text())
    m["contract"]["grid"] = [3, 3]
    (model_copy / "manifest.json").write_text(json.dumps(m))
    proc = classify(str(images_100x[0]), "--model", str(model_copy))
    assert proc.returncode == 2 and "[batch, 9, 3, 224, 224]" in proc.stderr

    m["contract"]["grid"] = [2, 3]
    m["contract"]["mean"] = [0, 0, 0]
    (model_copy / "manifest.json").write_text(json.dumps(m))
    proc = classify(str(images_100x[0]), "--model", str(model_copy))
    assert proc.returncode == 2 and "differs" in proc.stderr


def test_corrupt_manifest(model_copy, images_100x):
    (model_copy / "manifest.json").write_text("{not json")
    proc = classify(str(images_100x[0]), "--model", str(model_copy))
    assert proc.returncode == 2 and "manifest is not valid JSON" in proc.stderr


def test_what_a_folder_holds_but_is_not_read_is_said_and_recursive_reads_subfolders(model_dir, images_100x,
                                                                                     tmp_path):
    d = tmp_path / "run"
    (d / "sub").mkdir(parents=True)
    shutil.copy(images_100x[0], d / "a.png")
    shutil.copy(images_100x[1], d / "sub" / "b.png")
    (d / "notes.gif").write_bytes(b"GIF89a")
    (d / "gone.png").symlink_to(tmp_path / "missing.png")
    (d / "loop").symlink_to(d)
    proc = classify(str(d), "--model", str(model_dir), "--jsonl")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["path"] for x in proc.stdout.splitlines()] == [str(d / "a.png")]  # one line per image
    for why in ("notes.gif: skipped, not a supported image type", "gone.png: skipped, broken link",
                "loop: skipped, a link to a folder", "sub: skipped, a folder (use --recursive)"):
        assert why in proc.stderr
    proc = classify(str(d), "--model", str(model_dir), "--jsonl", "--recursive")
    assert [json.loads(x)["path"] for x in proc.stdout.splitlines()] == [str(d / "a.png"), str(d / "sub" / "b.png")]


def test_a_file_that_is_not_a_checkpoint_gets_a_short_reason(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"PK\x03\x04 not really a zip")
    proc = run_module("export", "onnx", "--checkpoint", str(tmp_path / "x.pt"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a readable PyTorch checkpoint" in proc.stderr
    assert "weights_only" not in proc.stderr


@pytest.mark.parametrize("module", ["runtime.serve", "runtime.watch", "runtime.slide"])
def test_every_runtime_cli_validates_backend_and_takes_precision_and_preprocess(module, tmp_path):
    args = [str(tmp_path)] if module in ("runtime.watch", "runtime.slide") else []
    extra = ["--out", str(tmp_path / "r.jsonl")] if module == "runtime.watch" else []
    proc = run_module(module, *args, *extra, "--backend", "bogus")
    assert proc.returncode == 2 and "auto" in proc.stderr and "onnxruntime-cuda" in proc.stderr
    help_text = run_module(module, "--help").stdout
    assert "--precision" in help_text and "--preprocess" in help_text


def test_json_and_jsonl_together_are_refused(model_dir, images_100x):
    proc = classify("--model", str(model_dir), "--json", "--jsonl", str(images_100x[0]))
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr and not proc.stdout


def test_decode_workers_help_states_both_defaults():
    out = " ".join(classify("--help").stdout.split())
    assert "next to CPU inference, the cores, at most 4" in out and "the cores but one, at most 16" in out


def test_a_backend_is_closed_when_the_gpu_preprocessor_then_fails(model_dir, monkeypatch):
    from runtime.backends import ort
    from runtime.errors import Unavailable
    from runtime.gpu import preprocessor as gpu
    from runtime.pipeline.classifier import Classifier

    def cannot_start(*_args, **_kw):  # the kernel failing to start, as on a machine without pycuda or a GPU
        raise Unavailable("GPU preprocessing cannot start here")

    closed, close = [], ort.OrtBackend.close
    monkeypatch.setattr(ort.OrtBackend, "close", lambda self: (closed.append(self.name), close(self)))
    monkeypatch.setattr(gpu, "GpuPreprocessor", cannot_start)
    with pytest.raises(Unavailable, match="cannot start here"):
        Classifier(model_dir, backend="cpu", preprocess="gpu")  # the backend opens, then the kernel cannot
    assert closed == ["onnxruntime-cpu-fp32"]


def test_the_camera_overlay_uses_the_contracts_label(images_100x):
    from runtime.pipeline.results import FieldResult, Result
    from runtime.pipeline.stream import GREEN, RED, annotate

    frame = np.full((460, 700, 3), 255, np.uint8)
    field = FieldResult(0, 0, 0, 0, 460, 700, 6, 0.9, "Carcinoma")
    res = Result("frame", "Carcinoma", 0.9, [field])
    assert tuple(annotate(frame, res, "Carcinoma")[0, 0]) == RED  # a contract whose positive label is not "Malignant"
    assert tuple(annotate(frame, res, "Malignant")[0, 0]) == GREEN


def test_every_refusal_names_the_next_step(model_dir):
    """A variant never made names the command that makes it; TensorRT's absence says where TensorRT comes from."""
    from runtime.backends.engines import TrtUnavailable, import_tensorrt
    from runtime.model.manifest import ModelError
    from runtime.model.model_dir import ModelDir

    with pytest.raises(ModelError, match=f"python -m export int8 -m {model_dir} --calib-images FOLDER"):
        ModelDir.open(model_dir).variant("int8")
    try:
        import tensorrt
    except ImportError:
        tensorrt = None
    if tensorrt is not None and hasattr(tensorrt, "Runtime"):
        pytest.skip("the TensorRT runtime is installed here: nothing to refuse")
    with pytest.raises(TrtUnavailable, match="JetPack"):
        import_tensorrt()
