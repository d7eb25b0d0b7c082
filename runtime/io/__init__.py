"""Reading inputs: which files are images or slides, decoding with limits, command-line inputs, slide sources, scale,
and every preprocessed field of a folder's images (calibration and gates)."""
