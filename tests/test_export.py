"""python -m export: artefacts, parity report, FP16 layout, determinism, checkpoint errors."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch

from export.onnx_export import OPSET, fp16_structure
from runtime.model.model_dir import ModelDir
from tests.conftest import REPO, run_module


def test_reference_artefacts(model_dir):
    m = ModelDir.open(model_dir).manifest
    assert m.provenance.trained is False and "UNTRAINED" in m.provenance.notes
    assert m.contract.grid == (2, 3) and m.contract.patch == 224 and m.contract.channel_order == "BGR"
    assert set(m.files) == {"model.onnx", "model.fp16.onnx", "weights.pt", "stain_reference.json"}
    files = {k: v.file for k, v in m.variants.items()}
    assert files.pop("bf16", "model.onnx") == "model.onnx"  # where this CPU gated BF16: tests/test_cpu_tier.py
    assert files == {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}
    report = json.loads((model_dir / "export_report.json").read_text())
    assert "real images" in report["gate_inputs"] and report["rejected"] == {}
    for batch in (1, 4):
        gate = report["gates"][f"fp32_batch{batch}"]
        assert gate["ok"] and {o["output"]: o["max_abs"] for o in gate["outputs"]}["logit"] <= 1e-4
    onx = onnx.load(str(model_dir / "model.onnx"))
    assert {o.domain: o.version for o in onx.opset_import}[""] == OPSET == 17  # the declared opset, not the default
    dims = [d.dim_param or d.dim_value for d in onx.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 6, 3, 224, 224]
    meta = {p.key: p.value for p in onx.metadata_props}
    assert json.loads(meta["contract"])["mean"] == [103.939, 116.779, 123.68]
    f16 = onnx.load(str(model_dir / "model.fp16.onnx"))
    assert fp16_structure(f16) == []
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in f16.graph.initializer)
    lstm = next(n for n in onx.graph.node if n.op_type == "LSTM")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lstm.attribute}
    assert attrs.get("layout", 0) == 0 and attrs.get("input_forget", 0) == 0 and attrs["direction"] == b"bidirectional"


def test_fp16_structure_check_catches_fp32_conv(model_dir):
    assert any("not float16" in p for p in fp16_structure(onnx.load(str(model_dir / "model.onnx"))))


def test_mismatched_checkpoint_is_refused_with_every_problem(model_dir, tmp_path):
    sd = torch.load(model_dir / "weights.pt", weights_only=True)["state_dict"]
    del sd["head.dense.bias"]
    sd["encoder.dense.weight"] = sd["encoder.dense.weight"][:, :10]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    proc = run_module("export", "onnx", "--checkpoint", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2  # an unusable input, as in every CLI
    for needle in ("missing keys: head.dense.bias", "unexpected keys: extra.weight",
                   "encoder.dense.weight: checkpoint (512, 10) vs model (512, 512)"):
        assert needle in proc.stderr
    assert not (tmp_path / "out" / "model.onnx").exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint"])
def test_corrupt_checkpoint(tmp_path, content):
    (tmp_path / "c.pt").write_bytes(content)
    proc = run_module("export", "onnx", "--checkpoint", str(tmp_path / "c.pt"), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a readable PyTorch checkpoint" in proc.stderr and "c.pt" in proc.stderr


def test_an_identical_export_is_reused_and_a_changed_or_damaged_one_is_made_again(model_dir, tmp_path, shared_data):
    """The cache (export/cache.py) on the narrow model's checkpoint: made, reused under another description, made
    anew where its entry is damaged; the two exports made without reuse are byte-identical (the export is
    deterministic: the same checkpoint gives the same ONNX files)."""
    cache = tmp_path / "cache"
    env = {"BREAKHIS_EXPORT_CACHE": str(cache)}
    base = ["export", "onnx", "--checkpoint", str(model_dir / "weights.pt"), "--parity-count", "1", "--gate-count",
            "1", "--parity-images", str(shared_data / "breakhis-100x")]
    args = [*base, "--variants", "fp16"]
    first = run_module(*args, "-o", str(tmp_path / "a"), env=env, check=True)
    assert "reused" not in first.stderr and len(list(cache.iterdir())) == 1
    second = run_module(*args, "-o", str(tmp_path / "b"), "--source", "another description", env=env, check=True)
    assert "its files were reused" in second.stderr
    a, b = ModelDir.open(tmp_path / "a").manifest, ModelDir.open(tmp_path / "b").manifest
    assert a.files == b.files and a.variants == b.variants and set(a.files) == {"model.onnx", "model.fp16.onnx",
                                                                                "weights.pt", "stain_reference.json"}
    assert b.provenance.source == "another description" and a.provenance.source != b.provenance.source
    assert json.loads((tmp_path / "b" / "export_report.json").read_text())["export_cache"]["reused"] is True
    (entry,) = cache.iterdir()
    with open(entry / "model.fp16.onnx", "r+b") as f:  # damaged in place
        f.seek(1000)
        f.write(b"\x00" * 64)
    again = run_module(*args, "-o", str(tmp_path / "d"), env=env, check=True)
    assert "is damaged" in again.stderr and "reused" not in again.stderr
    assert ModelDir.open(tmp_path / "d").manifest.files == a.files  # made anew, the same bytes
    for f in ("model.onnx", "model.fp16.onnx"):  # the same checkpoint, exported twice without reuse: byte-identical
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "d" / f).read_bytes(), f
    assert a.provenance.trained is True  # a checkpoint given by path is taken as trained


def test_the_export_key_changes_with_every_input_it_names(model_dir, shared_data, tmp_path):
    from export.cache import export_key

    prov = ModelDir.open(model_dir).manifest.provenance
    images = shared_data / "breakhis-100x"
    opts = {"parity_count": 6, "gate_count": None, "range_safe": True, "variants": ["bf16"]}
    key = export_key(prov, images, opts)
    assert key == export_key(prov, images, dict(opts))
    assert key == export_key(replace(prov, source="other words"), images, opts)  # the manifest's text only
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(images.glob("*.png"))[:3]:
        (few / p.name).symlink_to(p)
    changed = [export_key(replace(prov, sha256="0" * 64), images, opts),  # other weights
               export_key(prov, few, opts),  # other gate images
               export_key(prov, images, opts | {"gate_count": 8}), export_key(prov, images, opts | {"variants": []})]
    assert len({key, *changed}) == 5


def test_the_export_key_covers_every_module_an_export_imports():
    """The key's code is export/ and the runtime/ modules an export can import (export/cache.py: ``code_files``,
    which reads the imports inside functions too from the source): every module that importing each of export/'s
    modules loads is in it, none of them imports by a computed name, and what only people run (apps, slides,
    cohorts) is not, so moving those re-exports nothing."""
    from export.cache import code_files

    files = {p.relative_to(REPO).as_posix() for p in code_files()}
    script = ("import importlib, pathlib, sys\n"
              "for f in sorted(pathlib.Path('export').glob('*.py')): importlib.import_module(f'export.{f.stem}')\n"
              "print(*(getattr(m, '__file__', None) for n, m in list(sys.modules.items()) if n.split('.')[0] in "
              "('export', 'runtime')))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                            check=True).stdout.split()
    loaded_rel = {Path(f).resolve().relative_to(REPO).as_posix() for f in loaded}
    assert "runtime/pipeline/classifier.py" in loaded_rel and loaded_rel <= files, loaded_rel - files
    for f in files:
        text = (REPO / f).read_text()
        assert "import_module(" not in text and "__import__(" not in text, f
    assert not any(f.startswith(("runtime/apps/", "runtime/slides/", "runtime/cohorts/")) for f in files), files
    assert {"runtime/pipeline/quality.py", "runtime/backends/trt_build.py", "export/cache.py"} <= files


def test_the_exported_graph_has_no_shape_arithmetic(model_dir):
    """Nothing ONNX Runtime would compute on the CPU between GPU kernels (it kept CUDA graphs from capturing the
    model): the LSTM's initial states are ONNX's default zeros, not zeros built from the input's shape."""
    from export.onnx_export import SHAPE_OPS

    for name in ("model.onnx", "model.fp16.onnx"):
        m = onnx.load(str(model_dir / name))
        assert not {n.op_type for n in m.graph.node} & set(SHAPE_OPS), name
        (lstm,) = [n for n in m.graph.node if n.op_type == "LSTM"]
        assert len(lstm.input) <= 5 and list(lstm.output)[:2] == ["", lstm.output[1]] and lstm.output[1], name


def test_setup_keeps_a_readable_model_and_exports_a_damaged_one_again(model_dir, tmp_path):
    """setup.sh's own check (its ``usable`` function, run by bash as setup.sh runs it): a model directory this code
    can read is kept on a rerun; one whose manifest is damaged, or that is absent, is exported again."""
    import shutil

    script = (REPO / "setup.sh").read_text()
    usable = script[script.index("usable() {"):script.index("; }", script.index("usable() {")) + 3]

    def keeps(path: Path) -> bool:
        return subprocess.run(["bash", "-c", f'{usable}\nusable "$1"', "usable", str(path)], cwd=REPO,
                              check=False).returncode == 0

    assert keeps(model_dir)
    damaged = tmp_path / "damaged"
    shutil.copytree(model_dir, damaged)
    (damaged / "manifest.json").write_text("{")
    assert not keeps(damaged) and not keeps(tmp_path / "absent")
