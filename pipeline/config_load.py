"""Loading a run config: a YAML file or a dict, dotted overrides, validation into the typed
``RunConfig`` of ``pipeline.config``, and the error messages (``ConfigError``, one line per
problem, naming the file, the dotted key and, for a choice, the allowed values).

``load(path, overrides)`` reads the YAML, applies ``key=value`` overrides (values parsed by
``yaml.safe_load``; keys checked against the schema) and validates strictly; ``from_dict``
validates a parsed mapping.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config import ConfigError, RunConfig, _KeyedError


# -- loading ----------------------------------------------------------------------------------
def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith("["):
            out += part
        else:
            out += f".{part}" if out else part
    return out


def _section_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that the path ``loc`` (of section names) leads to."""
    cls: type[BaseModel] = RunConfig
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        cls = ann
    return cls


def _describe(err: dict) -> tuple[str, str]:
    """(dotted key, problem) for one pydantic error dict."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    kind, ctx = err["type"], err.get("ctx") or {}
    got = err.get("input")
    if kind == "extra_forbidden":
        section = _section_at(loc[:-1])
        allowed = f" (allowed: {', '.join(section.model_fields)})" if section else ""
        return _dotted(loc), f"unknown key{allowed}"
    if kind == "missing":
        return _dotted(loc), "required key is missing"
    if kind in ("literal_error", "enum"):
        section = _section_at(loc[:-1])
        field = section.model_fields.get(loc[-1]) if section else None
        choices = typing.get_args(field.annotation) if field else ()
        allowed = ", ".join(map(repr, choices)) if choices else ctx.get("expected", "?")
        return _dotted(loc), f"must be one of {allowed} (got {got!r})"
    if kind == "value_error" and isinstance(ctx.get("error"), _KeyedError):
        e = ctx["error"]
        return _dotted((*loc, e.key) if e.key else loc), e.msg
    msg = err["msg"].removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "model_attributes_type":
        msg = f"{msg} (got {got!r})"
    return _dotted(loc) or "<top level>", msg


def _format(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors(include_url=False):
        key, msg = _describe(e)
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def from_dict(raw: dict, source: str = "<dict>") -> RunConfig:
    """Validate a raw dict (parsed YAML) into a ``RunConfig``; errors become ``ConfigError``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format(source, err)) from None


def _schema_child(cls: Any, part: str) -> Any:
    """The type under key ``part`` of ``cls`` (a section class or ``dict``), or raise KeyError."""
    if cls is dict:
        return dict
    field = cls.model_fields.get(part)
    if field is None:
        raise KeyError(", ".join(cls.model_fields))
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    if typing.get_origin(ann) is dict:
        return dict
    return None  # a leaf


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], source: str) -> dict:
    """Apply dotted ``key=value`` overrides to ``raw`` in place (values via ``yaml.safe_load``);
    keys are checked against the schema, and free-form maps (``model.overrides``) get new keys."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{source}: override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            msg = f"{source}: {key}: unparsable override value {text!r}: {err}"
            raise ConfigError(msg) from None
        parts = key.split(".")
        node, cls = raw, RunConfig
        for i, part in enumerate(parts):
            where = ".".join(parts[: i + 1])
            if cls is None:
                raise ConfigError(f"{source}: {key}: {'.'.join(parts[:i])} is not a section")
            try:
                child = _schema_child(cls, part)
            except KeyError as err:
                at = "" if where == key else f" {where}"
                msg = f"{source}: {key}: unknown key{at} (allowed: {err.args[0]})"
                raise ConfigError(msg) from None
            if i == len(parts) - 1:
                node[part] = value
                break
            nxt = node.get(part)
            if cls is RunConfig and part == "model" and isinstance(nxt, str):
                nxt = {"preset": nxt}  # the shorthand `model: tiny`
            if nxt is None:
                nxt = {}
            if not isinstance(nxt, dict) or child is None:
                raise ConfigError(f"{source}: {key}: {where} is not a section")
            node[part] = nxt
            node, cls = nxt, child
    return raw


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML run config, apply dotted ``key=value`` overrides, validate strictly."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{source}: cannot read the config: {err.strerror or err}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping, got {type(raw).__name__}")
    return from_dict(apply_overrides(raw, list(overrides), source), source)
