"""The client layer: the Python API, the command line, comparisons, the watchdog and the
metrics exporter. The one layer that uses both ``pipeline`` and ``workers``."""
