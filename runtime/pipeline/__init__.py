"""From decoded pixels to verdicts: the classifier's stages (decode-and-plan, quality, preprocessors, scheduler,
re-check, results), and a camera or video stream classified through them (`stream.py`)."""
