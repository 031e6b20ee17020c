"""Evaluation as a library: used by the training loop (per epoch), and later by `flat-ray eval` and reports."""
