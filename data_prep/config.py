"""The staging config: typed, strict (an unknown key is an error), loadable from YAML or flags.

A staging job is a value: the same config on the same inputs gives the same bytes. Fields that
change the output (source, tokenizer, filters, split rule, packing, limits) are hashed into the
dataset *fingerprint* recorded in the manifest, so a rerun into a directory holding a different
dataset is refused instead of mixing the two. Fields that only change how the work runs
(``out``, ``workers``, ``task_mb``, ``keep_parts``) are not part of it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_HUB_REPO = "HuggingFaceFW/fineweb-edu"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HubSource(Strict):
    """A dataset on the Hugging Face hub, streamed through ``datasets`` (one task per file).
    ``repo`` may also be a local folder laid out like a hub dataset."""

    type: Literal["hub"] = "hub"
    repo: str = DEFAULT_HUB_REPO
    subset: str | None = "sample-10BT"
    revision: str = "main"
    split: str = "train"
    text_field: str = "text"
    id_field: str | None = "id"


class FilesSource(Strict):
    """Local files, folders or globs: parquet, jsonl / jsonl.gz, or txt."""

    type: Literal["files"] = "files"
    paths: list[str] = Field(min_length=1)
    format: Literal["auto", "parquet", "jsonl", "txt"] = "auto"
    text_field: str = "text"
    id_field: str | None = "id"
    separator: str | None = Field(
        default=None, description="txt: the string between documents; None: one per file")


class BuiltinSource(Strict):
    """Text that ships with Python (so the quickstart needs no network)."""

    type: Literal["builtin"] = "builtin"
    name: Literal["python-docs"] = "python-docs"


Source = Annotated[HubSource | FilesSource | BuiltinSource, Field(discriminator="type")]


class Filters(Strict):
    """Documents failing a filter are dropped and counted per filter."""

    min_int_score: int | None = None  # FineWeb-Edu's 0-5 educational score
    languages: list[str] | None = None  # e.g. ["en"]; needs a `language` field
    min_chars: int = Field(default=0, ge=0)


class SplitRule(Strict):
    """A document goes to ``val`` when hash(salt, key) / 2^64 < val_fraction. ``key: id`` uses
    the document id and falls back to the text when there is none."""

    val_fraction: float = Field(default=0.005, ge=0.0, lt=1.0)
    key: Literal["id", "text"] = "id"
    hash: Literal["blake2b-64"] = "blake2b-64"
    salt: str = "walsh-split/1"


class Packing(Strict):
    chunk_tokens: int = Field(default=1 << 16, ge=2)
    shard_mb: float = Field(default=256.0, gt=0)

    def chunks_per_shard(self, itemsize: int) -> int:
        return max(1, int(self.shard_mb * (1 << 20)) // (self.chunk_tokens * itemsize))


class StageConfig(Strict):
    source: Source
    out: str
    tokenizer: str = "r50k_base"
    filters: Filters = Filters()
    split: SplitRule = SplitRule()
    packing: Packing = Packing()
    max_docs: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    # how the work runs (not part of the fingerprint)
    workers: int | None = Field(default=None, ge=1)
    task_mb: float = Field(default=16.0, gt=0)
    keep_parts: bool = False

    def output_identity(self) -> dict:
        """The fields that decide the output bytes (the tokenizer as configured; the stage adds
        the resolved ranks hash and the input files)."""
        return self.model_dump(mode="json", exclude={"out", "workers", "task_mb", "keep_parts"})


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def format_errors(err: ValidationError, where: str) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        parts.append(f"{loc or '<root>'}: {e['msg']}")
    return f"{where}: " + "; ".join(parts)


def from_dict(raw: dict, where: str = "config") -> StageConfig:
    """Validate ``raw``; a ValueError names the key and what was wrong."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a staging config must be a mapping, got {type(raw).__name__}")
    try:
        return StageConfig.model_validate(raw)
    except ValidationError as err:
        raise ValueError(format_errors(err, where)) from None


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file (unvalidated)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{path}: a staging config must be a mapping")
    return dict(raw or {})


def load(path: str | os.PathLike, **overrides) -> StageConfig:
    """Read and validate a YAML staging config; ``overrides`` (not None) replace top-level
    keys."""
    raw = read_yaml(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(raw, str(path))


def parse_source(spec: list[str] | str, **options) -> dict:
    """``--source`` strings -> a source mapping: ``builtin:python-docs``, ``hub:REPO``
    (``hf://datasets/REPO`` too), or one or more local paths / globs. ``options`` (subset,
    revision, text_field, ...) not None are added."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    opts = {k: v for k, v in options.items() if v is not None}
    first = specs[0]
    if first.startswith("builtin:"):
        return {"type": "builtin", "name": first.split(":", 1)[1], **opts}
    for prefix in ("hub:", "hf://datasets/", "hf:"):
        if first.startswith(prefix):
            if len(specs) > 1:
                raise ValueError("--source: give one hub dataset at a time")
            return {"type": "hub", "repo": first[len(prefix):], **opts}
    return {"type": "files", "paths": specs, **opts}
