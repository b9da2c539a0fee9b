"""Configs as code: each module's `get_config()` returns an `ml_collections.ConfigDict` (docstrings say the
command that runs it). Importable as `configs.<name>`, so configs derive from each other by import."""
