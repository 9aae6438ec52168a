"""Experiments over whole runs: the pipeline generators (presets and orders as package data), the scorer,
statistics over seeds, routing analysis and re-evaluation with a replaced routing."""
