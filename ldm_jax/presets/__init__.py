"""Hyper-parameters of every published model, as frozen dataclass instances (one file a family)."""
