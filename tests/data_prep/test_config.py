"""The staging config: every shipped file parses, errors name the key, flags build configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from data_prep import cli, config
from data_prep.config import BuiltinSource, FilesSource, HubSource, StageConfig

CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "data").glob("*.yaml"))


def test_there_are_data_configs():
    names = {p.name for p in CONFIGS}
    assert {"fineweb-edu-10bt.yaml", "python-docs.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_data_config_loads(path):
    cfg = config.load(path)
    assert isinstance(cfg, StageConfig) and cfg.out


def test_shipped_configs_mean_what_they_say():
    fw = config.load(CONFIGS[0].parent / "fineweb-edu-10bt.yaml")
    assert isinstance(fw.source, HubSource)
    assert (fw.source.repo, fw.source.subset) == ("HuggingFaceFW/fineweb-edu", "sample-10BT")
    assert fw.tokenizer == "r50k_base" and fw.packing.chunk_tokens == 1 << 16
    docs = config.load(CONFIGS[0].parent / "python-docs.yaml")
    assert isinstance(docs.source, BuiltinSource)


def test_unknown_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("source: {type: builtin}\nout: x\npacking: {chunk_tokns: 8}\n")
    with pytest.raises(ValueError, match=r"c.yaml: packing.chunk_tokns: Extra inputs"):
        config.load(p)


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ValueError, match="split.val_fraction"):
        config.from_dict({"source": {"type": "builtin"}, "out": "x",
                          "split": {"val_fraction": 1.5}})
    with pytest.raises(ValueError, match="source: .*'s3'.*'hub', 'files', 'builtin'"):
        config.from_dict({"source": {"type": "s3"}, "out": "x"})
    with pytest.raises(ValueError, match="source.builtin.name: Input should be 'python-docs'"):
        config.from_dict({"source": {"type": "builtin", "name": "perl-docs"}, "out": "x"})
    p = tmp_path / "bad.yaml"
    p.write_text("source: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        config.load(p)


def test_fingerprint_ignores_how_the_work_runs():
    a = config.from_dict({"source": {"type": "builtin"}, "out": "a", "workers": 1})
    b = config.from_dict({"source": {"type": "builtin"}, "out": "b", "workers": 2,
                          "task_mb": 1, "keep_parts": True})
    c = config.from_dict({"source": {"type": "builtin"}, "out": "a",
                          "packing": {"chunk_tokens": 1024}})
    fp = lambda cfg: config.fingerprint(cfg.output_identity())
    assert fp(a) == fp(b) != fp(c)


def test_parse_source():
    assert config.parse_source(["builtin:python-docs"]) == {"type": "builtin",
                                                            "name": "python-docs"}
    hub = config.parse_source("hub:HuggingFaceFW/fineweb-edu", subset="sample-100BT")
    assert HubSource(**hub).subset == "sample-100BT"
    assert config.parse_source("hf://datasets/a/b")["repo"] == "a/b"
    files = FilesSource(**config.parse_source(["x.parquet", "d/"], text_field="content"))
    assert files.paths == ["x.parquet", "d/"] and files.text_field == "content"


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    argv = ["data", "stage", *kw.pop("argv", [])]
    return parser.parse_args(argv)


def test_flags_build_a_config():
    cfg = cli.config_from_args(_args(argv=["--source", "a.jsonl", "b.jsonl", "--out", "o",
                                           "--workers", "3", "--chunk-tokens", "512",
                                           "--min-int-score", "3", "--language", "en"]))
    assert cfg.source.paths == ["a.jsonl", "b.jsonl"] and cfg.workers == 3
    assert cfg.packing.chunk_tokens == 512 and cfg.packing.shard_mb == 256
    assert cfg.filters.min_int_score == 3 and cfg.filters.languages == ["en"]


def test_flags_override_a_config_file():
    path = str(CONFIGS[0].parent / "fineweb-edu-10bt.yaml")
    cfg = cli.config_from_args(_args(argv=[path, "--out", "elsewhere", "--subset",
                                           "sample-100BT", "--val-fraction", "0.01"]))
    assert cfg.out == "elsewhere" and cfg.source.subset == "sample-100BT"
    assert cfg.split.val_fraction == 0.01 and cfg.split.key == "id"
    assert cfg.filters.languages == ["en"]


def test_stage_needs_a_source_and_an_out():
    with pytest.raises(ValueError, match="CONFIG or --source"):
        cli.config_from_args(_args(argv=["--out", "o"]))
    with pytest.raises(ValueError, match="--out DIR is required"):
        cli.config_from_args(_args(argv=["--source", "builtin:python-docs"]))
