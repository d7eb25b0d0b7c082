"""Reading inputs: which files are images or slides, decoding with limits, command-line inputs, slide sources, scale."""
