"""Slides, stage mosaics and large regions: planning a slide's fields and classifying them through the shared
Classifier (`classify.py`), a field's record (`fields.py`), the slide's result (`result.py`), the region verdict
(`aggregate.py`), bands of field rows and their merge (`bands.py`), one module per output format (`geojson.py`,
`table.py`: CSV, `overlay.py`: the overlay and its legend, `probability_map.py`: OME-TIFF) and writing outputs whole
(`files.py`). The CLI (`runtime/apps/slide.py`), the server's slide jobs, the watch folder and cohorts call it."""
