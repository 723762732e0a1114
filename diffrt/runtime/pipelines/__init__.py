"""Pipelines over model packages; see `registry.py` for which class serves which package."""
