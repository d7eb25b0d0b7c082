"""What people run: the classify CLI, the page and HTTP API, the watch folder, slides, the camera stream."""
