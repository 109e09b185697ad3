"""The run configuration: YAML -> typed, validated ``RunConfig``.

Strict on purpose: every section forbids unknown keys, so a typo fails before any Ray worker or
DeepSpeed engine starts instead of silently training with a default. Every error is a
``ConfigError`` (a ``ValueError``) whose message names the file, the dotted key, the problem and,
for a choice, the allowed values -- one line per problem.

Layout of a train YAML (every section but ``data`` and ``train`` has defaults)::

    name: my-run
    model: {preset: walsh-o-125m, overrides: {n_layer: 6}}   # or the shorthand  model: tiny
    data: {path: data/fineweb-edu-10bt, seq_len: 1024}
    optim: {...}; schedule: {...}; train: {steps: 1000}; tracking: {...}; cluster: {...}

Dotted overrides (``train.steps=50 model.overrides.n_layer=4 tracking.uri=null``) are applied to
the raw YAML before validation, with values parsed by ``yaml.safe_load``.

``RunConfig.walsh_config()`` (not ``model_config``: pydantic reserves that name for its settings)
builds the ``WalshConfig``. Reading a file, the dotted overrides and the error messages are in
``pipeline.config_load`` (``load``, ``from_dict``, ``apply_overrides``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    field_validator,
    model_validator,
)

from walsh.models.config import WalshConfig
from walsh.models.presets import get_preset, presets

# torch.compile modes that replay CUDA graphs (``train.compile_mode``)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# how each parameter's first gradient of a step leaves a CUDA graph's pool
# (``train.grad_copy``; pipeline.parallelize._own_grads)
GradCopy = Literal["param", "pass"]
GRAD_COPIES = get_args(GradCopy)
GRAD_COPY_DEFAULT: GradCopy = "pass"  # train.grad_copy's, compile_model's and the bench's


class ConfigError(ValueError):
    """A configuration problem; the message names the file (if any) and the dotted key."""


class _KeyedError(ValueError):
    """Raised inside validators so the formatter can name ``loc + key`` instead of the section."""

    def __init__(self, key: str, msg: str) -> None:
        super().__init__(msg)
        self.key, self.msg = key, msg


_STRICT = ConfigDict(extra="forbid")
_WALSH_FIELDS = tuple(f.name for f in dataclasses.fields(WalshConfig))
_WALSH_ERR = re.compile(r"^WalshConfig\.(\w+): (.*)$", re.S)


# -- sections ---------------------------------------------------------------------------------
class ModelCfg(BaseModel):
    """A named preset (code) plus field overrides; validated by building the ``WalshConfig``."""

    model_config = _STRICT
    preset: str = "tiny"
    overrides: dict[str, Any] = {}

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        if v not in presets:
            raise ValueError(f"unknown model preset {v!r}; known: {', '.join(sorted(presets))}")
        return v

    @field_validator("overrides")
    @classmethod
    def _known_fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key not in _WALSH_FIELDS:
                raise _KeyedError(
                    str(key), f"unknown model field (allowed: {', '.join(_WALSH_FIELDS)})"
                )
        return v

    @model_validator(mode="after")
    def _builds(self) -> ModelCfg:
        try:
            self.build()
        except ConfigError as err:
            key, _, msg = str(err).partition(": ")
            raise _KeyedError(key.removeprefix("model.").removeprefix("model"), msg) from err
        return self

    def build(self) -> WalshConfig:
        """``get_preset(preset, **overrides)``; a WalshConfig error is re-raised as a
        ``ConfigError`` naming ``model.overrides.<field>`` (or ``model.preset`` when the field
        comes from the preset and conflicts with the overrides)."""
        try:
            return get_preset(self.preset, **self.overrides)
        except KeyError as err:
            raise ConfigError(f"model.preset: {err.args[0] if err.args else err}") from err
        except TypeError as err:  # a field WalshConfig does not take
            raise ConfigError(f"model.overrides: {err}") from err
        except ValueError as err:
            m = _WALSH_ERR.match(str(err))
            if not m:
                raise ConfigError(f"model: {err}") from err
            field, msg = m.groups()
            if field in self.overrides:
                raise ConfigError(f"model.overrides.{field}: {msg}") from err
            raise ConfigError(
                f"model.preset: {field} of preset {self.preset!r} conflicts with the overrides: "
                f"{msg} (set model.overrides.{field})"
            ) from err


class DataCfg(BaseModel):
    model_config = _STRICT
    path: str  # a staged dataset directory (manifest.json + shards)
    seq_len: StrictInt = Field(1024, gt=0)
    train_split: str = "train"
    val_split: str = "val"
    num_workers: StrictInt = Field(0, ge=0)  # dataloader workers per rank


class OptimCfg(BaseModel):
    model_config = _STRICT
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    decay_embeddings: bool = False
    # AdamW's implementation: "auto" = torch's fused kernel on CUDA, foreach on CPU; "deepspeed"
    # = DeepSpeed's FusedAdam (a JIT-built op, GPU only; its build failed on the H100 image).
    impl: Literal["auto", "foreach", "fused", "deepspeed"] = "auto"
    muon_lr: float = Field(0.02, gt=0)
    muon_momentum: float = Field(0.95, ge=0, lt=1)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        for i, b in enumerate(v):
            if not 0 <= b < 1:
                raise _KeyedError(f"[{i}]", f"must be in [0, 1), got {b}")
        return v


class ScheduleCfg(BaseModel):
    """LR multiplier over steps. ``two_stage`` is BitNet's: stage 1 goes linearly from 1.0 to
    ``stage1_end_ratio`` at ``stage_boundary``; stage 2 starts at ``stage2_start_ratio`` (an
    explicit, intended drop) and decays linearly to ``min_lr_ratio`` with weight decay
    ``stage2_weight_decay``. Both levels are config values so that no cliff is accidental."""

    model_config = _STRICT
    kind: Literal["cosine", "wsd", "two_stage", "constant"] = "cosine"
    warmup_steps: StrictInt = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: final fraction of steps spent decaying
    stage_boundary: float = Field(0.5, gt=0, lt=1)  # two_stage: where stage 2 starts
    stage1_end_ratio: float = Field(0.5, ge=0, le=1)
    stage2_start_ratio: float = Field(0.3, ge=0, le=1)
    stage2_weight_decay: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _stage2_decays(self) -> ScheduleCfg:
        if self.kind == "two_stage" and self.min_lr_ratio > self.stage2_start_ratio:
            raise _KeyedError(
                "min_lr_ratio",
                f"two_stage decays from stage2_start_ratio={self.stage2_start_ratio} down to "
                f"min_lr_ratio, which is larger ({self.min_lr_ratio})",
            )
        return self


class TrainCfg(BaseModel):
    model_config = _STRICT
    steps: StrictInt | None = Field(None, gt=0)
    token_budget: StrictInt | None = Field(None, gt=0)
    micro_batch: StrictInt = Field(8, gt=0)  # sequences per rank per micro step
    global_batch: StrictInt | None = Field(None, gt=0)  # per optimizer step; None: micro*world
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    zero_stage: Literal[0, 1, 2, 3] = 2
    # more of DeepSpeed's "zero_optimization" block (overlap_comm, reduce_bucket_size, ...),
    # passed through as given and validated by DeepSpeed itself; the stage is zero_stage's
    zero_options: dict[str, Any] = Field(default_factory=dict)
    ckpt_interval: StrictInt = Field(1000, gt=0)
    keep_last: StrictInt = Field(3, gt=0)
    eval_interval: StrictInt = Field(500, gt=0)
    eval_batches: StrictInt = Field(20, gt=0)
    log_interval: StrictInt = Field(10, gt=0)
    seed: StrictInt = 0
    max_bad_steps: StrictInt = Field(10, gt=0)  # NaN/inf steps in a row before stopping
    run_dir: str = "runs/default"
    compile: bool = False
    # torch.compile's mode (for what compile_scope covers); "reduce-overhead" replays CUDA graphs,
    # which takes the per-kernel launch cost off the host (a 2-GPU walsh-h ZeRO-2 step
    # launched ~1,900 kernels; on 1 H200 it took walsh-h-125m from 249-282k to 408-416k tok/s,
    # docs/benchmarks.md, 2026-11-30, sessions 5-6). "default" is torch's default
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    # what one compiled graph covers (pipeline.parallelize.compile_model): "model" the whole
    # forward (one graph each way: inductor fuses across the blocks' seams, and under CUDA
    # graphs one replay each way; on an H200 walsh-h-125m +3.1% tok/s, dense-125m +2.7%, but
    # compiling takes ~6x longer as every block is traced: 173 s against 28 for walsh-h-125m;
    # docs/benchmarks.md, session 33); "blocks" each transformer block's forward and the
    # loss's head apart (one graph serves all blocks; ZeRO-3's leaf modules need it); "auto"
    # (the default): "model" at ZeRO-0, "blocks" at ZeRO 1-3. Why not "model" at ZeRO 1-2:
    # its backward hands autograd every gradient at its end, so DeepSpeed's per-parameter
    # hooks (bucketed reductions, overlap_comm) cannot overlap the backward, and full
    # gradients live together before partitioning; per block they arrive block by block. Not
    # measured on several GPUs; "model" may be set there
    compile_scope: Literal["auto", "blocks", "model"] = "auto"
    # under CUDA graphs, how each parameter's first gradient of a step leaves the graphs'
    # pool (pipeline.parallelize._own_grads): "pass" copies a backward pass's all at its end,
    # one copy per dtype (the default: faster, pipeline.parallelize._PassCopy has the
    # figures); "param" clones each as it arrives
    grad_copy: GradCopy = GRAD_COPY_DEFAULT
    activation_checkpointing: bool = False
    peak_tflops: float | None = Field(None, gt=0)  # override of the per-device peak for MFU
    # [start, stop]: torch.profiler over those optimizer steps on rank 0 (pipeline/profiling.py)
    profile_steps: tuple[StrictInt, StrictInt] | None = None

    @property
    def compile_unit(self) -> str:
        """``compile_scope`` resolved: "model" or "blocks"."""
        if self.compile_scope != "auto":
            return self.compile_scope
        return "model" if self.zero_stage == 0 else "blocks"

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled graphs replay CUDA graphs (``CUDA_GRAPH_MODES``)."""
        return self.compile and self.compile_mode in CUDA_GRAPH_MODES

    @field_validator("zero_options")
    @classmethod
    def _zero_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        if "stage" in v:
            raise _KeyedError("stage", "set the stage with train.zero_stage")
        if v.get("compute_grad_norm", True) is False:
            # at ZeRO 1-3 the NaN guard is DeepSpeed's own skip of a non-finite global norm
            # (pipeline.guard); without the norm a NaN step would be applied silently
            raise _KeyedError("compute_grad_norm", "must stay true: the NaN/inf guard at ZeRO "
                              "1-3 relies on DeepSpeed's gradient norm")
        return v

    @field_validator("profile_steps")
    @classmethod
    def _window(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 0 < v[0] < v[1]:
            raise _KeyedError("", f"must be [start, stop] with 0 < start < stop, got {list(v)}")
        return v

    @field_validator("token_budget", mode="before")
    @classmethod
    def _scientific_budget(cls, v: Any) -> Any:
        """Accept 2.5e9 (a float, or a string as YAML 1.1 reads it) when it is a whole number."""
        if isinstance(v, (str, float)) and not isinstance(v, bool):
            try:
                f = float(v)
            except ValueError:
                return v
            if f.is_integer():
                return int(f)
        return v

    @model_validator(mode="after")
    def _one_length(self) -> TrainCfg:
        if self.steps is None and self.token_budget is None:
            raise _KeyedError("steps", "set exactly one of train.steps / train.token_budget")
        if self.steps is not None and self.token_budget is not None:
            raise _KeyedError(
                "token_budget",
                "train.steps and train.token_budget are exclusive; set exactly one "
                f"(got steps={self.steps}, token_budget={self.token_budget})",
            )
        return self


class TrackingCfg(BaseModel):
    model_config = _STRICT
    enabled: bool = True
    uri: str | None = None  # None: sqlite:///<run_dir>/mlflow.db, or MLFLOW_TRACKING_URI
    experiment: str = "walsh"
    run_name: str | None = None


class ClusterCfg(BaseModel):
    model_config = _STRICT
    workers: StrictInt = Field(1, gt=0)  # training processes
    gpus_per_worker: float = Field(1, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    address: str | None = None  # Ray address; None: local, or RAY_ADDRESS
    max_failures: StrictInt = Field(2, ge=0)  # Ray restarts of a failed worker group
    # NVLink SHARP multicast (NCCL NVLS, symmetric-memory multimem). Off by default: on shared
    # multi-GPU hosts a program using it was seen to take the host's GPUs out of service, and
    # plain NVLink ring/tree all-reduce is what the scaling figures were measured with. true
    # leaves the NCCL_NVLS_ENABLE / TORCH_SYMM_MEM_DISABLE_MULTICAST / NVSHMEM_DISABLE_NVLS
    # environment as the user set it (pipeline.launch.multicast_env)
    nvlink_multicast: bool = False


class RunConfig(BaseModel):
    model_config = _STRICT
    name: str = "run"
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg
    optim: OptimCfg = Field(default_factory=OptimCfg)
    schedule: ScheduleCfg = Field(default_factory=ScheduleCfg)
    train: TrainCfg
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)
    cluster: ClusterCfg = Field(default_factory=ClusterCfg)

    @field_validator("model", mode="before")
    @classmethod
    def _preset_shorthand(cls, v: Any) -> Any:
        return {"preset": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _muon_needs_whole_matrices(self) -> RunConfig:
        # ZeRO 1-3 hand the optimizer flattened partitions; Muon orthogonalizes whole matrices
        if self.optim.name == "muon" and self.train.zero_stage != 0:
            raise _KeyedError(
                "optim.name",
                f"muon needs unflattened parameters: set train.zero_stage: 0 "
                f"(got {self.train.zero_stage})",
            )
        return self

    @model_validator(mode="after")
    def _cuda_graphs_need_resident_parameters(self) -> RunConfig:
        # ZeRO-3 gathers each block's parameters into fresh memory at every forward and frees
        # them after; a CUDA graph replays fixed addresses, so it would be re-recorded at every
        # call (up to torch's limit, then run eager). Not measured: refused, not left to find
        if self.train.cuda_graphs and self.train.zero_stage == 3:
            raise _KeyedError(
                "train.compile_mode",
                f"{self.train.compile_mode!r} replays CUDA graphs, which need parameters at "
                "fixed addresses; ZeRO-3 gathers them anew each step: use 'default' or "
                "'max-autotune-no-cudagraphs', or train.zero_stage 0-2",
            )
        return self

    @model_validator(mode="after")
    def _zero3_compiles_blocks(self) -> RunConfig:
        # ZeRO-3 gathers each block (a leaf module) by hooks around its call; a whole-model
        # graph would trace those hooks (graph breaks at every block) and read partitioned
        # parameters as empty tensors inside the graph
        if self.train.compile and self.train.zero_stage == 3 and \
                self.train.compile_scope == "model":
            raise _KeyedError(
                "train.compile_scope",
                "'model' traces ZeRO-3's per-block gathers into the graph: use 'blocks' or "
                "'auto' at train.zero_stage 3",
            )
        return self

    def walsh_config(self) -> WalshConfig:
        """The model's config, with ``block_size`` raised to ``data.seq_len`` if smaller (RoPE
        tables must cover the training window)."""
        cfg = self.model.build()
        if cfg.block_size < self.data.seq_len:
            cfg = cfg.replace(block_size=self.data.seq_len)
        return cfg

    def to_yaml(self) -> str:
        """The resolved config (every default filled in); loads back to an equal RunConfig."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values (for MLflow params), e.g. ``{"optim.lr": 3e-4}``."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = obj

        walk("", self.model_dump(mode="json"))
        return out


# -- derived quantities and cross-checks ------------------------------------------------------
def resolve_batch(cfg: RunConfig, world_size: int) -> tuple[int, int, int]:
    """(micro_batch, grad_accum, global_batch) for ``world_size`` ranks."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    micro = cfg.train.micro_batch
    per_step = micro * world_size
    glob = cfg.train.global_batch if cfg.train.global_batch is not None else per_step
    if glob % per_step:
        raise ConfigError(
            f"train.global_batch: {glob} is not a multiple of train.micro_batch ({micro}) * "
            f"world size ({world_size}) = {per_step}"
        )
    return micro, glob // per_step, glob


def total_steps(cfg: RunConfig, world_size: int) -> int:
    """Optimizer steps: ``train.steps``, or the token budget over tokens per step (rounded up)."""
    if cfg.train.steps is not None:
        return cfg.train.steps
    _, _, glob = resolve_batch(cfg, world_size)
    return math.ceil(cfg.train.token_budget / (glob * cfg.data.seq_len))


def resolved_precision(cfg: RunConfig, device_type: str) -> str:
    """``train.precision`` with ``auto`` resolved: bf16 on CUDA, fp32 elsewhere (the one
    resolution, for the trainer and the dry run)."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if device_type == "cuda" else "fp32"


def check_against_manifest(cfg: RunConfig, manifest, world_size: int = 1) -> None:
    """Fail early if the staged data cannot feed this model/run: a tokenizer vocab larger than
    the model's, a missing or empty split, or a split too small to give every stream
    (rank x dataloader worker x batch row: the loader's lanes) one chunk (the loader's rule)
    and one ``[seq_len + 1]`` window."""
    where = f"data.path={cfg.data.path}"
    model_vocab = cfg.walsh_config().vocab_size
    data_vocab = manifest.tokenizer.vocab_size
    if data_vocab > model_vocab:
        raise ConfigError(
            f"model.overrides.vocab_size: the model's vocab_size {model_vocab} is smaller than "
            f"the dataset tokenizer's {data_vocab} ({manifest.tokenizer.name}, {where})"
        )
    window = cfg.data.seq_len + 1
    train_streams = max(1, world_size) * max(1, cfg.data.num_workers) * cfg.train.micro_batch
    # evaluation reads min(world, val chunks) streams without loader workers (ranks share
    # streams when the validation split is small), so it needs one chunk and one window
    for key, split, streams in (("data.train_split", cfg.data.train_split, train_streams),
                                ("data.val_split", cfg.data.val_split, 1)):
        shards = manifest.split(split)
        tokens = sum(s.tokens for s in shards)
        if not shards:
            have = ", ".join(manifest.splits) or "none"
            raise ConfigError(f"{key}: split {split!r} is not in {where} (splits: {have})")
        if tokens == 0:
            raise ConfigError(f"{key}: split {split!r} of {where} is empty")
        chunks = sum(s.samples for s in shards)
        if chunks < streams:  # pipeline.loader gives every stream whole chunks
            raise ConfigError(
                f"{key}: split {split!r} of {where} has {chunks} chunks, fewer than the {streams} "
                f"streams (world size {world_size} x max(1, data.num_workers) x "
                f"train.micro_batch, one per batch row); every stream needs at least one chunk"
            )
        if tokens < streams * window:
            raise ConfigError(
                f"{key}: split {split!r} of {where} has {tokens} tokens, fewer than one window "
                f"of data.seq_len + 1 = {window} tokens for each of {streams} streams "
                f"(world size {world_size} x data.num_workers {cfg.data.num_workers} x "
                f"train.micro_batch {cfg.train.micro_batch})"
            )
