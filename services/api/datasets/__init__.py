"""Datasets: field mapping, upload sources, Redis storage and the lazy feeder."""
