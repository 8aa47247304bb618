"""The configuration: the schema of every section and key, YAML loading with ``base:`` and overrides,
validation. ``python -m launch.config`` prints the key reference (docs/LAUNCHER.md)."""
