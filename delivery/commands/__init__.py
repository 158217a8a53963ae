"""CLI command groups; each module owns its commands and registers them on the root app."""
