"""The Jinja2 environment of every page (``pipeline/reports/templates``, autoescaped, strict
about undefined names) and the shared stylesheet."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "templates"


@functools.lru_cache(maxsize=1)
def environment() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    from pipeline.backbones import describe_input

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined,
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True,
                      lstrip_blocks=True)
    env.filters["input_size"] = describe_input
    return env


def render(template: str, **context: Any) -> str:
    """A whole page (the stylesheet inlined)."""
    css = (TEMPLATES / "base.css").read_text()
    return str(environment().get_template(template).render(css=css, **context))


def fragment(template: str, **context: Any) -> str:
    """A part of a page (a section)."""
    return str(environment().get_template(template).render(**context))
