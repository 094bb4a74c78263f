"""Command-line programs: one module per command, the scaffolding they share in common.py."""
