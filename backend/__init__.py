"""Pre-labelling server for human parsing: the core behind model.py, the batch CLI and the demo page."""
