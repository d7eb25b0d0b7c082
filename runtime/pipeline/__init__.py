"""From decoded pixels to verdicts: field tiling, CPU preprocessing, and the classifier's stages."""
