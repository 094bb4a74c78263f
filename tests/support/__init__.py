"""Shared test builders: tiny specs and models, pipelines, checkpoint files, the toy task."""
