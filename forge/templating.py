"""The one way forge renders Jinja: StrictUndefined, templates from `templates/`, typed context.

`templates/` is the package `forge.templates` (a package-dir mapping in pyproject.toml), so the
same lookup works from a clone, an editable install and an installed wheel.

Recipe values reach templates only as data in the context (never as template source), so a
recipe string like `{{ ... }}` is rendered literally; values placed in Dockerfile instructions
go through the `json` filter, which quotes them.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import jinja2

TEMPLATES_DIR = Path(str(importlib.resources.files("forge.templates")))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # Dockerfiles and YAML, not HTML; values are quoted with the json filter
    )
    # Plain JSON quoting (Jinja's own tojson escapes quotes and <>& for HTML, unreadable here).
    env.filters["json"] = lambda value: json.dumps(value, ensure_ascii=False)
    return env


def render(template: str, context: dict) -> str:
    return environment().get_template(template).render(**context)
