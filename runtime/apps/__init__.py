"""What people run, as entry points over the packages below: the classify CLI, the page and HTTP API, the watch folder,
the slide and cohort CLIs, the camera stream."""
