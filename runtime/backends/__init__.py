"""Inference backends (ONNX Runtime, OpenVINO, TensorRT) behind one interface (base), chosen once (choose),
with the TensorRT engines of a model directory (engines) and their builder (trt_build)."""
