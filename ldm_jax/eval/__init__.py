"""Evaluation of trained models: prompt adherence on the built-in shapes dataset."""
