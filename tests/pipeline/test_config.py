"""The run config: strict loading, errors that name the key, overrides, derived quantities,
manifest cross-checks, the dry-run report, and every YAML under configs/ loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from data_prep.manifest import Manifest, ShardInfo, TokenizerInfo
from pipeline.config import (
    ConfigError,
    ModelCfg,
    RunConfig,
    check_against_manifest,
    resolve_batch,
    total_steps,
)
from pipeline.config_load import from_dict, load
from pipeline.dry_run import describe, memory_estimate, meta_model
from walsh.models import WalshLM
from walsh.models.presets import get_preset

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAIN = sorted((CONFIGS / "train").glob("*.yaml"))
MODELS = sorted((CONFIGS / "models").glob("*.yaml"))
OTHER = sorted(
    p for p in CONFIGS.rglob("*.y*ml") if p.parent not in (CONFIGS / "train", CONFIGS / "models")
)
BASE = {"data": {"path": "d"}, "train": {"steps": 10}}


def raw(**sections) -> dict:
    out = {k: dict(v) for k, v in BASE.items()}
    out.update(sections)
    return out


def write(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# -- every file under configs/ --------------------------------------------------------------
def test_configs_exist():
    names = {p.stem for p in TRAIN}
    for kind in ("dense", "walsh-o", "walsh-h"):
        for size in ("125m", "350m"):
            assert f"fineweb-{kind}-{size}" in names
            assert (CONFIGS / "models" / f"{kind}-{size}.yaml").is_file()
    assert {"quickstart", "cpu-smoke"} <= names
    assert (CONFIGS / "models" / "tiny.yaml").is_file()


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: p.name)
def test_train_config_loads(path: Path):
    cfg = load(path)
    assert cfg.walsh_config().block_size >= cfg.data.seq_len
    world = cfg.cluster.workers
    micro, accum, glob = resolve_batch(cfg, world)
    assert micro * accum * world == glob
    assert total_steps(cfg, world) > cfg.schedule.warmup_steps
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg  # the resolved YAML round-trips


def test_fineweb_configs_follow_the_plan():
    for path in TRAIN:
        if not path.stem.startswith("fineweb-"):
            continue
        cfg = load(path)
        assert (cfg.data.path, cfg.data.seq_len) == ("data/fineweb-edu-10bt", 1024)
        assert (cfg.train.precision, cfg.train.zero_stage) == ("bf16", 2)
        size = path.stem.rsplit("-", 1)[1]
        n_dense = meta_model(get_preset(f"dense-{size}")).num_params()["total"]
        assert 18 <= cfg.train.token_budget / n_dense <= 22
        expected = "two_stage" if cfg.walsh_config().ternary else ("cosine", "wsd")
        assert cfg.schedule.kind in expected


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.name)
def test_model_config_loads(path: Path):
    text = path.read_text()
    cfg = ModelCfg.model_validate(yaml.safe_load(text))
    assert path.stem == cfg.preset
    cfg.build()
    # the commented example of overrides must stay valid too
    example = re.search(r"^# (overrides: \{.*\})$", text, re.M)
    assert example, "each model config shows an example of overrides"
    ModelCfg(preset=cfg.preset, **yaml.safe_load(example.group(1))).build()


def test_other_yaml_parses():
    for path in OTHER:  # configs/data, configs/sweeps: owned elsewhere, here only parsed
        yaml.safe_load(path.read_text())


# -- strictness: errors name the key ---------------------------------------------------------
def test_unknown_keys_are_named(tmp_path: Path):
    msg = error(load, write(tmp_path, raw(bogus=1)))
    assert "run.yaml" in msg and "bogus: unknown key" in msg and "allowed:" in msg
    msg = error(load, write(tmp_path, raw(optim={"lrr": 1e-3})))
    assert "optim.lrr: unknown key" in msg and "lr," in msg
    msg = error(from_dict, raw(model={"preset": "tiny", "overrides": {"bogus": 1}}))
    assert "model.overrides.bogus" in msg and "n_layer" in msg
    msg = error(from_dict, raw(train={"steps": 5, "stepz": 5}))
    assert "train.stepz: unknown key" in msg


def test_wrong_type_names_key():
    msg = error(from_dict, raw(train={"steps": "many"}), source="x.yaml")
    assert msg.startswith("x.yaml: train.steps:") and "'many'" in msg
    assert "train.steps" in error(from_dict, raw(train={"steps": True}))
    assert "optim.lr" in error(from_dict, raw(optim={"lr": -1}))
    assert "data.seq_len" in error(from_dict, raw(data={"path": "d", "seq_len": 0}))
    assert "optim.betas[1]" in error(from_dict, raw(optim={"betas": [0.9, 1.5]}))
    assert "data: required key is missing" in error(from_dict, {"train": {"steps": 1}})


def test_literal_lists_allowed_values():
    msg = error(from_dict, raw(schedule={"kind": "linear"}))
    assert "schedule.kind" in msg
    for choice in ("cosine", "wsd", "two_stage", "constant", "'linear'"):
        assert choice in msg
    msg = error(from_dict, raw(train={"steps": 1, "zero_stage": 4}))
    assert "train.zero_stage: must be one of 0, 1, 2, 3" in msg
    assert "'adamw', 'muon'" in error(from_dict, raw(optim={"name": "sgd"}))


def test_cuda_graphs_refused_at_zero3():
    """CUDA graphs replay fixed addresses; ZeRO-3 gathers parameters anew at every step."""
    for mode in ("reduce-overhead", "max-autotune"):
        msg = error(from_dict, raw(train={"steps": 1, "zero_stage": 3, "compile": True,
                                          "compile_mode": mode}))
        assert "train.compile_mode" in msg and mode in msg and "ZeRO-3" in msg
    ok = [raw(train={"steps": 1, "zero_stage": z, "compile": c, "compile_mode": m})
          for z, c, m in ((3, True, "max-autotune-no-cudagraphs"), (3, True, "default"),
                          (2, True, "reduce-overhead"), (3, False, "reduce-overhead"))]
    for cfg in ok:
        from_dict(cfg)


def test_one_error_per_line():
    msg = error(from_dict, raw(optim={"lr": 0, "name": "sgd"}, bogus=2))
    assert len(msg.splitlines()) == 3
    assert all(line.startswith("<dict>: ") for line in msg.splitlines())


def test_steps_and_token_budget_are_exclusive():
    msg = error(from_dict, raw(train={"steps": 10, "token_budget": 1000}))
    assert "train.steps" in msg and "train.token_budget" in msg
    msg = error(from_dict, raw(train={"micro_batch": 2}))
    assert "train.steps" in msg and "train.token_budget" in msg
    assert from_dict(raw(train={"token_budget": "2.5e6"})).train.token_budget == 2_500_000


def test_schedule_two_stage_levels_checked():
    msg = error(from_dict, raw(schedule={"kind": "two_stage", "min_lr_ratio": 0.5}))
    assert "schedule.min_lr_ratio" in msg
    assert "schedule.stage_boundary" in error(from_dict, raw(schedule={"stage_boundary": 1.0}))


def test_model_errors_name_the_field():
    msg = error(from_dict, raw(model={"preset": "walsh-o-125m", "overrides": {"n_head": 12}}))
    assert "model.overrides.n_head" in msg and "mixing group 8" in msg
    msg = error(ModelCfg(preset="walsh-o-125m").model_copy(update={"overrides": {"n_head": 12}})
                .build)
    assert msg.startswith("model.overrides.n_head:")
    msg = error(from_dict, raw(model={"preset": "dense-125m", "overrides": {"n_embd": 100}}))
    assert "model.preset" in msg and "model.overrides.n_head" in msg
    msg = error(from_dict, raw(model="nope"))
    assert "model.preset" in msg and "walsh-o-125m" in msg


def test_model_shorthand_and_block_size():
    cfg = from_dict(raw(model="walsh-h-125m", data={"path": "d", "seq_len": 2048}))
    assert cfg.model == ModelCfg(preset="walsh-h-125m")
    wc = cfg.walsh_config()
    assert wc.block_size == 2048 and wc.algebra == "walsh"
    assert from_dict(raw(data={"path": "d", "seq_len": 16})).walsh_config().block_size == 256


# -- dotted overrides --------------------------------------------------------------------------
def test_dotted_overrides(tmp_path: Path):
    path = write(tmp_path, raw(model="tiny"))
    cfg = load(path, [
        "train.steps=7", "optim.lr=1e-3", "train.compile=true", "tracking.uri=null",
        "tracking.run_name=abc", "model.overrides.n_layer=3", "optim.betas=[0.8, 0.9]",
        "cluster.gpus_per_worker=0.5", "name=x=y",
    ])
    assert cfg.train.steps == 7 and cfg.optim.lr == 1e-3 and cfg.train.compile is True
    assert cfg.tracking.uri is None and cfg.tracking.run_name == "abc"
    assert cfg.model.preset == "tiny" and cfg.model.overrides == {"n_layer": 3}
    assert cfg.walsh_config().n_layer == 3
    assert cfg.optim.betas == (0.8, 0.9) and cfg.cluster.gpus_per_worker == 0.5
    assert cfg.name == "x=y"
    flat = cfg.flat()
    assert flat["optim.lr"] == 1e-3 and flat["model.overrides.n_layer"] == 3
    assert flat["train.steps"] == 7 and "model" not in flat

    # a section absent from the file is created
    cfg = load(write(tmp_path, BASE), ["schedule.kind=wsd", "train.token_budget=null"])
    assert cfg.schedule.kind == "wsd"


def test_bad_overrides_name_the_key(tmp_path: Path):
    path = write(tmp_path, BASE)
    assert "bogus.x: unknown key" in error(load, path, ["bogus.x=1"])
    assert "train.stepz: unknown key" in error(load, path, ["train.stepz=1"])
    assert "optim.lr.x" in error(load, path, ["optim.lr.x=1"])
    assert "expected key=value" in error(load, path, ["train.steps"])
    msg = error(load, path, ["model.overrides.bogus=1"])
    assert "model.overrides.bogus" in msg
    msg = error(load, path, ["train.zero_stage=5"])
    assert "run.yaml: train.zero_stage" in msg and "0, 1, 2, 3" in msg


def test_file_errors(tmp_path: Path):
    assert "cannot read" in error(load, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    assert "bad.yaml: invalid YAML" in error(load, bad)
    bad.write_text("- 1\n")
    assert "must be a mapping" in error(load, bad)


# -- derived quantities ------------------------------------------------------------------------
def test_resolve_batch():
    cfg = from_dict(raw(train={"steps": 1, "micro_batch": 4, "global_batch": 32}))
    assert resolve_batch(cfg, 1) == (4, 8, 32)
    assert resolve_batch(cfg, 4) == (4, 2, 32)
    msg = error(resolve_batch, cfg, 3)
    assert "train.global_batch" in msg and "world size (3)" in msg
    auto = from_dict(raw(train={"steps": 1, "micro_batch": 4}))
    assert resolve_batch(auto, 3) == (4, 1, 12)


def test_total_steps():
    cfg = from_dict(raw(
        data={"path": "d", "seq_len": 100},
        train={"token_budget": 10_001, "micro_batch": 5, "global_batch": 20},
    ))
    assert total_steps(cfg, 2) == 6  # ceil(10001 / (20 * 100))
    assert total_steps(from_dict(raw()), 8) == 10


# -- the manifest cross-check -------------------------------------------------------------------
def manifest(vocab: int = 50257, splits: dict[str, int] | None = None, chunk: int = 1024):
    splits = {"train": 10_000, "val": 2_000} if splits is None else splits
    shards = [
        ShardInfo(name=f"{s}-000000.tar", split=s, samples=-(-n // chunk), tokens=n,
                  sha256="0" * 64)
        for s, n in splits.items()
    ]
    return Manifest(
        tokenizer=TokenizerInfo("r50k_base", "0" * 64, vocab, vocab - 1), dtype="uint16",
        chunk_tokens=chunk, source={}, filters={}, split_rule={}, totals={}, shards=shards,
    )


def test_check_against_manifest():
    cfg = from_dict(raw(data={"path": "ds", "seq_len": 128}))
    check_against_manifest(cfg, manifest())
    msg = error(check_against_manifest, cfg, manifest(vocab=60_000))
    assert "model.overrides.vocab_size" in msg and "50257" in msg and "60000" in msg
    msg = error(check_against_manifest, cfg, manifest(splits={"train": 10_000}))
    assert "data.val_split" in msg and "'val'" in msg and "data.path=ds" in msg
    msg = error(check_against_manifest, cfg, manifest(splits={"train": 0, "val": 500}))
    assert "data.train_split" in msg and "empty" in msg
    small = manifest(splits={"train": 10_000, "val": 300}, chunk=64)
    check_against_manifest(cfg, small, world_size=2)  # 2 windows of 129 tokens fit
    # evaluation lets ranks share streams: a small val split only needs one window
    check_against_manifest(cfg, small, world_size=4)
    tiny_val = manifest(splits={"train": 10_000, "val": 100}, chunk=64)
    msg = error(check_against_manifest, cfg, tiny_val, world_size=1)
    assert "data.val_split" in msg and "100 tokens" in msg
    msg = error(check_against_manifest, cfg, manifest(splits={"train": 2048, "val": 500}), 3)
    assert "data.train_split" in msg and "2 chunks" in msg and "24 streams" in msg  # 3 x 8 rows
    bigger = cfg.model_copy(update={"model": ModelCfg(overrides={"vocab_size": 60_000})})
    check_against_manifest(bigger, manifest(vocab=60_000))


# -- dry run ------------------------------------------------------------------------------------
def test_describe_tiny():
    cfg = from_dict(raw(
        model="tiny", data={"path": "d", "seq_len": 128},
        train={"steps": 100, "micro_batch": 4, "global_batch": 16, "zero_stage": 3},
    ))
    text = describe(cfg, world_size=2, device="cpu")
    total = WalshLM(get_preset("tiny")).num_params()["total"]
    assert f"{total:,}" in text
    assert "preset: tiny" in text  # the resolved YAML
    assert "# linear layers: 14 x CayleyDicksonLinear: materialized, one GEMM" in text
    assert "accum 2 = global 16" in text and "2,048" in text  # 16 x 128 tokens per step
    assert f"{WalshLM(get_preset('tiny')).flops_per_token(128):,}" in text
    assert "by ZeRO stage" in text and "fp32" in text
    assert "WARNING" in text  # warmup 100 >= 100 steps

    mem = {z: memory_estimate(cfg, 2, "cuda", z) for z in range(4)}
    assert mem[3]["total"] < mem[2]["total"] < mem[1]["total"] < mem[0]["total"]
    assert mem[0]["optimizer"] == 12 * total and mem[3]["params"] == 2 * total // 2
    fp32 = memory_estimate(cfg, 2, "cpu", 0)
    assert fp32["params"] == 4 * total and fp32["optimizer"] == 8 * total
    ckpt = cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"activation_checkpointing": True})})
    assert memory_estimate(ckpt, 2)["activations"] < mem[3]["activations"]


def test_memory_estimate_counts_the_walsh_triton_paths_saved_transforms():
    """walsh_impl triton saves u (B*T*in per layer, bf16) and its own output (B*T*out), which
    is the tensor SDPA (v, and q and k with RoPE inside) and SwiGLU (gate, up) keep anyway: per
    block 6C + H of u, and 2C of outputs (o, down; 4C with q and k when RoPE runs apart); with
    a bias all seven outputs count. SwiGLU's product inside down (walsh_swiglu) is not stored,
    and the rough activation term counts it: H comes off. The other paths save none of this;
    with checkpointing, one block's worth. The estimate's totals against measured peaks are in
    the dry-run module doc."""
    def est(impl, ckpt=False, preset="walsh-h-125m", **over):
        cfg = from_dict(raw(model={"preset": preset, "overrides": {"walsh_impl": impl, **over}},
                            train={"steps": 1, "micro_batch": 2, "global_batch": 2,
                                   "precision": "bf16", "activation_checkpointing": ckpt}))
        return memory_estimate(cfg, 1, "cuda", 0), cfg
    tri, cfg = est("triton")
    wc = cfg.walsh_config()
    c, h, n_layer = wc.n_embd, wc.mlp_hidden, wc.n_layer
    tokens = 2 * cfg.data.seq_len
    assert tri["walsh_saved"] == 2 * tokens * n_layer * (6 * c + h + 2 * c - h)
    assert tri["total"] == sum(v for k, v in tri.items() if k != "total")
    rope_apart = est("triton", walsh_rope=False)[0]["walsh_saved"]
    assert rope_apart == 2 * tokens * n_layer * (6 * c + h + 4 * c - h)
    both_apart = est("triton", walsh_rope=False, walsh_swiglu=False)[0]["walsh_saved"]
    assert both_apart == 2 * tokens * n_layer * (6 * c + h + 4 * c)
    assert est("dense")[0]["walsh_saved"] == est("fused")[0]["walsh_saved"] == 0
    assert est("triton", ckpt=True)[0]["walsh_saved"] == 2 * tokens * (6 * c + h + 2 * c - h)
    biased = est("triton", bias=True)[0]["walsh_saved"]  # RoPE apart (a bias), SwiGLU inside
    assert biased == 2 * tokens * n_layer * (6 * c + h + 5 * c + 2 * h - h)
    # 350M's FFN hidden 2752 = 32 blocks x 86 lanes: the down projection's u is saved in rows of
    # 88 (16-byte rows), 2 more lanes x 32 blocks, 24 blocks; the outputs are token-major,
    # unpadded
    m350, cfg350 = est("triton", preset="walsh-h-350m")
    wc = cfg350.walsh_config()
    c, h = wc.n_embd, wc.mlp_hidden
    assert m350["walsh_saved"] == 2 * 2 * cfg350.data.seq_len * 24 * (8 * c + 2 * 32)


def test_describe_raises_on_bad_batch():
    cfg = from_dict(raw(train={"steps": 1, "micro_batch": 4, "global_batch": 6}))
    assert "train.global_batch" in error(describe, cfg, 1)


def test_runconfig_is_the_public_type():
    assert isinstance(from_dict(raw()), RunConfig)


def test_zero_options_and_multicast():
    """train.zero_options reaches DeepSpeed's zero_optimization block (the stage stays
    zero_stage's); NVLink multicast is off unless cluster.nvlink_multicast is set."""
    from pipeline.launch import multicast_env
    from pipeline.trainer import deepspeed_config

    cfg = from_dict(raw(train={"steps": 1, "zero_stage": 1,
                               "zero_options": {"reduce_bucket_size": 1000}}))
    assert deepspeed_config(cfg, 1, 1, 1, None)["zero_optimization"] == {
        "reduce_bucket_size": 1000, "stage": 1}
    msg = error(from_dict, raw(train={"steps": 1, "zero_options": {"stage": 3}}))
    assert "train.zero_options.stage" in msg and "train.zero_stage" in msg
    msg = error(from_dict, raw(train={"steps": 1, "zero_options": {"compute_grad_norm": False}}))
    assert "train.zero_options.compute_grad_norm" in msg and "NaN" in msg
    assert multicast_env(cfg) == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                  "NVSHMEM_DISABLE_NVLS": "1"}
    assert multicast_env(from_dict(raw(cluster={"nvlink_multicast": True}))) == {}


def test_compile_mode():
    assert from_dict(raw()).train.compile_mode == "default"
    cfg = from_dict(raw(train={"steps": 1, "compile": True, "compile_mode": "reduce-overhead"}))
    assert cfg.train.compile_mode == "reduce-overhead"
    msg = error(from_dict, raw(train={"steps": 1, "compile_mode": "fast"}))
    assert "train.compile_mode" in msg and "reduce-overhead" in msg


def test_compile_scope():
    """``auto`` compiles the whole model at ZeRO-0 and the blocks at ZeRO 1-3 (whose gradient
    reductions overlap a per-block backward; ZeRO-3's per-block gathers a whole-model graph
    would trace); ``model`` at ZeRO-3 is refused, naming the key; each is settable elsewhere."""
    unit = {z: from_dict(raw(train={"steps": 1, "zero_stage": z})).train.compile_unit
            for z in (0, 1, 2, 3)}
    assert unit == {0: "model", 1: "blocks", 2: "blocks", 3: "blocks"}
    for z, scope in ((0, "blocks"), (3, "blocks"), (1, "model"), (2, "model")):
        cfg = from_dict(raw(train={"steps": 1, "zero_stage": z, "compile_scope": scope}))
        assert cfg.train.compile_unit == scope
    msg = error(from_dict, raw(train={"steps": 1, "zero_stage": 3, "compile": True,
                                      "compile_scope": "model"}))
    assert "train.compile_scope" in msg and "ZeRO-3" in msg
    msg = error(from_dict, raw(train={"steps": 1, "compile_scope": "layers"}))
    assert "train.compile_scope" in msg and "blocks" in msg
