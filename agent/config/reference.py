"""``docs/config.md``: the configuration reference rendered from the field descriptions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from agent.config.loader import AgentConfig, _inner_model


def config_reference_markdown() -> str:
    """Render the configuration reference (``docs/config.md``) from the field descriptions.

    Returns:
        Markdown text: one table per section with key, type, default and description.
    """
    out = [
        "# fod-agent configuration reference",
        "",
        "Generated from the field descriptions in `agent/config/` by",
        "`python -m agent.config > docs/config.md` (a test checks that it is up to date).",
        "The commented template is `config.toml` at the repository root; `fod-agent --check-config`",
        "validates a file and exits non-zero naming the first invalid key.",
        "",
    ]
    _render_section(out, AgentConfig, "", "top level")
    return "\n".join(out).rstrip() + "\n"


def _render_section(out: list[str], model: type[BaseModel], prefix: str, title: str) -> None:
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    out += [f"## {title}", "", doc, "", "| key | type | default | description |", "| --- | --- | --- | --- |"]
    nested: list[tuple[str, type[BaseModel], bool]] = []
    for name, info in model.model_fields.items():
        inner = _inner_model(info.annotation)
        if inner is not None:
            is_list = "list" in str(info.annotation)
            nested.append((name, inner, is_list))
            continue
        type_text = _type_text(info.annotation)
        default = info.get_default(call_default_factory=True)
        default_text = "(host name)" if name == "agent_id" else _default_text(default)
        description = (info.description or "").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        out.append(f"| `{prefix}{name}` | {type_text} | {default_text} | {description} |")
    out.append("")
    for name, inner, is_list in nested:
        section = f"{prefix}{name}"
        header = f"[[{section}]]" if is_list else f"[{section}]"
        _render_section(out, inner, f"{section}.", f"`{header}`")


def _type_text(annotation: Any) -> str:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is Literal and args:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    text = str(annotation).replace("typing.", "").replace("pathlib.", "").replace("<class '", "")
    text = text.replace("'>", "").replace("NoneType", "None")
    return text.replace("|", "\\|")


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, Path):
        return f'`"{value}"`'
    return f"`{value}`"

