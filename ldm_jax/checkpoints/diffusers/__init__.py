"""diffusers format: key tables, architecture detection and export."""
