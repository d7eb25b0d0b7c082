"""Inference runtime for the BreakHis 100X classifier; packages by job (model, io, pipeline, gpu, backends, apps)."""
