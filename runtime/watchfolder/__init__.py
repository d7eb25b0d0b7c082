"""The watch folder below its command (runtime/apps/watch.py): the loop that takes settled files and classifies them
(`watcher.py`: `Watcher`) and its records, appended whole and read back at start (`records.py`)."""
