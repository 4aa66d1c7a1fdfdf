"""Helpers around the training scripts: result reports (``python -m reincarnate_utils.report``)."""
