"""Serving Dockerfiles and CI examples; installed as the package `forge.templates` (see pyproject.toml)."""
