"""Typed configuration: dataclasses, loaded from YAML, overridden with dotted `key=value`.

Defaults are the paper's (docs/method.md); `configs/*.yaml` override them per experiment.
Unknown keys and wrong types are errors that name the key and list the valid ones.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PACKAGE_DIR = Path(__file__).resolve().parent
TESTBED_MODEL = PACKAGE_DIR / "testbed_model"


class ConfigError(ValueError):
    """A configuration problem, with the key and the fix in the message."""


# the capability domains of the testbed and the paper's benchmarks (task.domain), and the
# evaluation splits of each: in-domain test, and transfer (other wordings, other benchmarks)
DOMAINS = ("math", "mcq", "code")
EVAL_SPLITS = ("test", "transfer")


@dataclass
class ModelConfig:
    path: str = str(TESTBED_MODEL)  # local HF folder or hub name
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False


# The paper's benchmarks on the Hugging Face hub: benchmark -> "name" or "name:config"
# (docs/method.md, "Evaluation"). MMLU's `all` config holds auxiliary_train as a flat split (its
# `auxiliary_train` config nests each row under a `train` column); BBH has a config per subtask.
HUB_DATASETS = {
    "gsm8k": "openai/gsm8k:main",
    "svamp": "ChilleD/SVAMP",
    "mmlu": "cais/mmlu:all",
    "bbh": "lukaemon/bbh",
    "mbpp": "google-research-datasets/mbpp:full",
    "mbpp_sanitized": "google-research-datasets/mbpp:sanitized",
    "codealpaca": "sahil2801/CodeAlpaca-20k",
}


@dataclass(frozen=True)
class Scorer:
    """What a built-in scorer of evaluation splits reads, and where it is the default."""
    needs: str = "gold"  # the evaluation row's field (ColumnsConfig) it reads: gold|tests|answer
    domain: str | None = None  # the domain (DOMAINS) whose splits it scores unless told otherwise
    accuracy: bool = True  # False: the split reports no accuracy (nll: the reference NLL only)


# The correctness-span rules by name (task.files.spans.rule): the paper's per benchmark. Their
# regexes are spd_ray.core.spans.SPAN_RULES, which checks at import that it has these names.
SPAN_RULE_NAMES = ("final_number", "answer_letter", "asserts")

# The built-in scorers, by name: the one list of them. spd_ray.tasks.evaluation registers the
# function of each that gives accuracy (`register_scorer`), checked at its import. Besides these,
# "module:function" names a user function (completion, gold) -> bool, imported and run in-process.
SCORERS = {
    "exact": Scorer(),
    "normalized": Scorer(),
    "number": Scorer(domain="math"),
    "choice": Scorer(domain="mcq"),
    "regex": Scorer(),
    "asserts": Scorer(needs="tests", domain="code"),
    "nll": Scorer(needs="answer", accuracy=False),
}
DOMAIN_SCORERS = {s.domain: name for name, s in SCORERS.items() if s.domain}  # domain -> default


@dataclass
class ColumnsConfig:
    """Which column of a task file holds what; a column a split does not need may be absent."""
    id: str | None = None  # None: the row number; ids must be unique within a file
    prompt: str = "prompt"  # every file
    answer: str = "answer"  # calibration: the reference completion; evaluation: the nll scorer's reference
    gold: str = "gold"  # evaluation: the expected answer (exact, normalized, number, choice, regex, user)
    tests: str = "tests"  # evaluation, asserts scorer: a list of assert lines
    setup: str = "setup"  # evaluation, asserts scorer: code run before the program (optional)
    answer_spans: str = "answer_spans"  # calibration, explicit spans: [[start, end], ...] into the answer


@dataclass
class SpansConfig:
    """Correctness spans of the calibration answers (paper Eq. 6), one of three ways: a named
    rule, a regex whose group 1 marks a span in the answer, or explicit character spans per
    example (the `columns.answer_spans` column) when neither is set."""
    rule: str | None = None  # one of SPAN_RULE_NAMES (the paper's rules)
    regex: str | None = None  # matched in the answer only, so the prompt is never labeled
    match: Literal["last", "all"] = "last"  # regex: the last match, or every match

    def __post_init__(self):
        if self.rule is not None and self.rule not in SPAN_RULE_NAMES:
            raise ConfigError(f"task.files.spans.rule={self.rule!r} is not a span rule; valid "
                              f"rules: {list(SPAN_RULE_NAMES)} (or give task.files.spans.regex)")
        if self.rule is not None and self.regex is not None:
            raise ConfigError("task.files.spans: set either rule or regex, not both (neither: "
                              "explicit spans from the answer_spans column)")

    @property
    def mode(self) -> str:
        return "rule" if self.rule else "regex" if self.regex else "explicit"


@dataclass
class FilesConfig:
    """A capability given as data files (task.source=files): JSONL, Parquet or CSV, local paths
    (relative: to the working directory) or fsspec URLs (s3://, gs://, hf://), read with `datasets`."""
    calibration: str | None = None  # labeled examples: prompt + answer (+ answer_spans)
    train: str | None = None  # training prompts: only the prompt column is read
    eval: dict[str, str] = field(default_factory=dict)  # split name -> file, e.g. {test: test.jsonl}
    format: Literal["auto", "json", "parquet", "csv"] = "auto"  # auto: from each file's extension
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    spans: SpansConfig = field(default_factory=SpansConfig)
    scorer: str = "exact"  # of every evaluation split: one of SCORERS, or module:function
    split_scorers: dict[str, str] = field(default_factory=dict)  # per split: {transfer: normalized}
    scorer_regex: str | None = None  # regex scorer: group 1 of its first match in the completion

    def __post_init__(self):
        for where, name in [("scorer", self.scorer), *((f"split_scorers.{k}", v) for k, v in self.split_scorers.items())]:
            if name not in SCORERS and not _is_user_scorer(name):
                raise ConfigError(f"task.files.{where}={name!r}; valid scorers: {list(SCORERS)} or "
                                  "module:function (a function of (completion, gold) run in-process)")
        unknown = sorted(set(self.split_scorers) - set(self.eval))
        if unknown:
            raise ConfigError(f"task.files.split_scorers.{unknown[0]} names no split of task.files.eval "
                              f"({list(self.eval)})")

    def scorer_of(self, split: str) -> str:
        return self.split_scorers.get(split, self.scorer)


def _is_user_scorer(name: str) -> bool:
    module, _, function = name.partition(":")
    return bool(module and function) and all(p.isidentifier() for p in [*module.split("."), function])


@dataclass
class TaskConfig:
    # testbed and hub: one of DOMAINS; files: the capability's name (a word: it prefixes split names)
    domain: str = "math"
    # testbed: the embedded synthetic tasks; hub: the paper's benchmarks (spd_ray.tasks.hub);
    # files: any capability from data files (task.files, spd_ray.tasks.files)
    source: Literal["testbed", "hub", "files"] = "testbed"
    # hub source: None loads by name from the hub; a folder holds local copies in the hub schema,
    # <data_dir>/<name>/<config or default>/<split>.jsonl or .parquet (see spd_ray.tasks.hub)
    data_dir: str | None = None
    hub_datasets: dict[str, str] = field(default_factory=dict)  # overrides of HUB_DATASETS
    files: FilesConfig = field(default_factory=FilesConfig)
    seed: int = 0  # data seed: which synthetic items are drawn; the hub source's shuffle
    # how many to use (files: the first n rows of each file; fewer rows: all of them)
    n_calibration: int = 50
    n_train_prompts: int = 2000
    n_eval: int = 200  # items per evaluation split
    n_eval_splits: dict[str, int] = field(default_factory=dict)  # per split: {"code/test": 257}
    # correctness: the paper's Eq. 6 loss on correctness spans; full: the Table 5 ablation
    calibration_loss: Literal["correctness", "full"] = "correctness"
    # raw: prompts as they are (the paper's); chat: each prompt as the user turn of the model's
    # chat template (after system_prompt), in every stage alike: calibration, generation,
    # fine-tuning and evaluation
    prompt_format: Literal["raw", "chat"] = "raw"
    system_prompt: str | None = None  # chat only

    def __post_init__(self):
        unknown = sorted(set(self.hub_datasets) - set(HUB_DATASETS))
        if unknown:
            raise ConfigError(f"unknown benchmark task.hub_datasets.{unknown[0]}; valid ones: {list(HUB_DATASETS)}")
        self.hub_datasets = {**HUB_DATASETS, **self.hub_datasets}
        if self.source != "files" and self.domain not in DOMAINS:
            raise ConfigError(f"task.domain={self.domain!r} is not allowed with task.source={self.source}; "
                              f"valid values: {list(DOMAINS)} (task.source=files takes any name)")
        if self.source == "files" and not (self.domain.isidentifier() or self.domain.replace("-", "_").isidentifier()):
            raise ConfigError(f"task.domain={self.domain!r}: the capability's name must be one word "
                              "(letters, digits, _ or -): it prefixes the split names, as in units/test")
        if self.system_prompt is not None and self.prompt_format != "chat":
            raise ConfigError("task.system_prompt needs task.prompt_format=chat")
        splits = list(self.files.eval) if self.source == "files" else list(EVAL_SPLITS)
        domains = [self.domain] if self.source == "files" else list(DOMAINS)
        for key in self.n_eval_splits:
            domain, _, split = key.partition("/")
            if domain not in domains or split not in splits:
                raise ConfigError(f"task.n_eval_splits key {key!r} must be <domain>/<split> with a "
                                  f"domain of {', '.join(domains)} and a split of {splits}")


@dataclass
class CalibrationConfig:
    layers: list[int] | None = None  # None: the paper's [L-1, L//2]; negative indices count from the end
    batch_size: int = 8
    max_length: int = 256  # calibration texts are truncated here, as in the authors' code
    num_workers: int = 2  # Ray workers that share the calibration set
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # 0: each worker holds a full replica; 3: the workers hold one ZeRO-3-partitioned model
    # between them (for models too large for one device: activation gradients need no
    # parameter gradients, so no optimizer state is ever built)
    zero_stage: Literal[0, 3] = 0
    max_failures: int = 3  # attempts made again on fresh workers when one is lost
    # how long the workers' placement group may wait for its GPUs/CPUs (an autoscaler adding
    # nodes takes minutes) before stage 1 stops and says what it asked for
    placement_timeout_s: float = 900.0


# The ways to choose the subspace's rank, and to run model-written code: named, so that the
# modules that check them list the same values.
RankMode = Literal["half", "fixed", "energy"]
SandboxMode = Literal["isolated", "process"]


@dataclass
class SubspaceConfig:
    # gradient: the paper's (the correctness loss's K/V gradients); random: the same ranks in
    # random directions; activation: the top principal directions of the K/V activations on the
    # calibration texts (no labels, no gradients): controls that tell a capability subspace
    # from any subspace
    kind: Literal["gradient", "random", "activation"] = "gradient"
    random_seed: int = 0  # for kind=random
    rank_mode: RankMode = "half"
    rank: int | None = None  # for rank_mode=fixed
    energy: float = 0.95  # for rank_mode=energy: smallest r with this fraction of sum S^2
    center: bool = True  # the authors' code mean-centres the gradient rows
    mode: Literal["both", "k_only", "v_only"] = "both"
    apply: Literal["fold", "hooks"] = "fold"  # same outputs; folding has no per-token cost
    # soft projection: K -> K (P + beta (I - P)), V alike; 0 is the paper's hard projection, 1 none
    beta: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"subspace.beta={self.beta}: the share of the directions outside the "
                              "subspace that the projection keeps, in [0, 1] (0: the paper's hard "
                              "projection, 1: none)")


@dataclass
class GenerationConfig:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    n_samples: int = 1
    batch_size: int = 32  # rows decoding at once (hf), continuously batched
    batches_per_call: int = 4  # hf: each replica call takes this many batches' prompts, so a finished row's slot goes to the next
    seed: int = 42
    project: bool = True  # False gives the unprojected baselines (PSR, SSD)
    backend: Literal["hf", "vllm"] = "hf"  # vllm: GPU clusters with vLLM installed
    replicas_min: int = 1  # Ray Data actor pool (autoscales between min and max)
    replicas_max: int = 2
    cpus_per_replica: float = 0.5  # fractional on CPU: a pool that takes every CPU starves the reader
    gpus_per_replica: float = 0.0  # vllm: a whole number, at least tensor_parallel_size
    # how long the pool's first replicas_min replicas may take to start (placed, model loaded;
    # an autoscaler adding GPU nodes takes minutes) before the stage stops and says what it asked
    start_timeout_s: float = 1800.0
    # vllm only. The engine fills its batch from the prompts of one call: give it large blocks
    vllm_batch_size: int = 2048
    # None: the longest prompt (measured on the driver) + the run's max_new_tokens; set: that
    # context, refused where a prompt would not fit
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9  # vLLM's share of its GPU (weights + KV cache)
    enforce_eager: bool = False  # True: no CUDA graphs (less memory, slower decoding)
    tensor_parallel_size: int = 1  # GPUs per vLLM engine
    # VLLM_BATCH_INVARIANT=1 on GPUs of compute capability 8.0+: a row's sample depends on its
    # seed alone, at a cost (every matmul in Triton kernels on A100/A10G/L4, slower
    # tensor-parallel communication); stage 2's resume needs only one completion per row
    batch_invariant: bool = False

    def __post_init__(self):
        if self.backend != "vllm":
            return
        if self.gpus_per_replica < max(1, self.tensor_parallel_size) or self.gpus_per_replica % 1:
            raise ConfigError(
                f"generation.backend=vllm with generation.gpus_per_replica={self.gpus_per_replica}: "
                "each vLLM engine takes whole GPUs (gpu_memory_utilization of each), set "
                f"generation.gpus_per_replica={max(1, self.tensor_parallel_size)} "
                "(= generation.tensor_parallel_size), or use generation.backend=hf")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"generation.gpu_memory_utilization={self.gpu_memory_utilization}: "
                              "a fraction of the GPU's memory, in (0, 1], e.g. 0.9")


@dataclass
class FinetuneConfig:
    method: Literal["lora", "full"] = "lora"
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    lr: float = 1e-5
    weight_decay: float = 0.01
    epochs: float = 5.0
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 256
    warmup_epochs: float = 0.5  # the authors' code warms up for half an epoch
    max_grad_norm: float = 1.0
    loss_on: Literal["all", "completion"] = "all"  # Eq. 14 trains on prompt + completion
    # pack a micro-batch's rows into sequences as long as its longest row (core.recipe.pack): the
    # same loss, fewer tokens computed; false: pad every row to the longest
    packing: bool = True
    seed: int = 42
    # Ray Train + DeepSpeed
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    use_gpu: bool = False  # precision: model.dtype on these devices (auto: bf16 on GPU)
    placement: Literal["PACK", "SPREAD"] = "PACK"  # Ray Train placement of the workers over nodes
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    checkpoints_to_keep: int = 2
    # a checkpoint at the end of every epoch, and also every this many optimizer steps and/or
    # seconds (0: off); a resume continues at the exact step with the same data order. 20 min:
    # a lost node costs at most that much training (a GSM8K epoch of the paper is ~1,900 steps)
    checkpoint_every_steps: int = 0
    checkpoint_every_s: float = 1200.0
    # a lost worker (or node) restarts the worker group from the latest checkpoint, up to this
    # many times; preemptions (spot nodes taken back) are retried without limit
    max_failures: int = 3
    export: Literal["merged", "adapter"] = "merged"  # LoRA: merge into the weights, or save the adapter
    # a merged LoRA model's dtype, merged in float32: "auto" keeps model.dtype where that keeps
    # >= 99% of the update (bf16 rounds a per-element update below half an ulp of its weight
    # away, ~6e-5 for weights of 0.02; the paper's lr gives ~1e-5), else float32, which the
    # evaluation then runs in (twice bf16's memory); "model": model.dtype whatever it loses
    export_dtype: Literal["auto", "model", "float32"] = "auto"


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: list(EVAL_SPLITS))
    domains: list[str] | None = None  # None: the task's own domain; list for out-of-domain
    batch_size: int = 64
    max_new_tokens: int = 256
    code_timeout_s: float = 5.0
    # model-written code: "isolated" (kernel namespaces via bubblewrap; refused where the machine
    # cannot isolate) or "process" (rlimits only, logged as a warning: no security boundary)
    sandbox: SandboxMode = "isolated"
    project: bool = False  # True: the inference-only baseline (base model with the projection on)


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "spd-ray"
    group: str | None = None  # experiment group; None: the run name
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: offline without an API key


FOLDER_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_folder_name(key: str, name: str, parent_key: str) -> None:
    """`name` is one folder of `parent_key`'s: a separator or `..` would write outside it."""
    if not FOLDER_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{key}={name!r}: it names one folder in {parent_key}, so it may hold "
                          "only letters, digits, '.', '_' and '-' (and is not . or ..), e.g. "
                          f"{key}=units-r2; put it elsewhere with {parent_key}")


@dataclass
class RunConfig:
    name: str = "spd"
    output_dir: str = "runs"  # local path, or shared storage (NFS mount) on multi-node clusters
    ray_address: str | None = None  # None: join a running cluster if there is one, else start one
    rounds: int = 1  # iterated SPD: round k calibrates on, samples from and trains round k-1's model; 0: the base model's evaluation only
    # the full output of Ray, the libraries and the workers on the console (--verbose); otherwise
    # the console shows the stages and the rest goes to runs/<name>/logs/driver.log
    verbose: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        check_folder_name("run.name", self.name, "run.output_dir")


@dataclass
class SPDConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    subspace: SubspaceConfig = field(default_factory=SubspaceConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


# ---------------------------------------------------------------------------------------
# Building dataclasses from plain data, with checked keys and types.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and lightly convert) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"{key}={value!r} is not allowed; valid values: {list(typing.get_args(tp))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key} may not be null")
        kinds = [arg for arg in args if arg is not type(None)]
        if len(kinds) == 1:  # X | None: X's own message (a Literal's lists the valid values)
            return _coerce(value, kinds[0], key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a mapping")
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{key} key"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of {[f.name for f in dataclasses.fields(tp)]}")
        return _build(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(
                f"{key}={value!r} has the wrong type: expected {tp.__name__}, got {type(value).__name__}"
            )
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; valid keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {names}"
        )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def deep_merge(base: dict, update: dict) -> dict:
    """`base` with `update` merged in, recursively: mappings merge, anything else replaces.
    Neither argument is modified."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. subspace.rank=32)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def _read_yaml(path: Path) -> Any:
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML (quote values that hold ': ' or braces): {err}") from err
    if loaded is None:  # a wrong path or an unsaved editor buffer far more often than intent
        raise ConfigError(f"config file {path} is empty (or only comments); check the path, or "
                          "save the file; for all defaults, give it one setting, e.g. `run: {}`")
    return loaded


BASE_KEY = "base"  # a config file's include: `base: <file, relative to this one>`


def _read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping, with its `base:` file (and that file's base, ...) loaded first
    and this file's keys deep-merged over it: a variant keeps only its differences."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config files include each other in a cycle ({chain}); remove the "
                          f"`{BASE_KEY}:` line of one of them")
    loaded = _read_yaml(path)
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = loaded.pop(BASE_KEY, None)
    if base is None:
        return loaded
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY}={base!r} must be the path of another config file, "
                          "relative to this one (e.g. base: ../qwen2.5-7b-gsm8k.yaml)")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: {BASE_KEY}: {base} names no file ({base_path}); the path is "
                          "relative to the file that names it")
    return deep_merge(_read_config_file(base_path, (*seen, path)), loaded)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> SPDConfig:
    """Defaults <- YAML file (after the file it names as `base:`, if any) <- `key=value`
    overrides, checked against the dataclasses."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; the shipped ones are in configs/")
        data = _read_config_file(path)
    for item in overrides:
        data = deep_merge(data, _parse_override(item))
    return _build(SPDConfig, data)


@dataclass
class MethodSpec:
    """One method of a comparison: a name and the overrides that make its training corpus."""
    name: str
    overrides: list[str] = field(default_factory=list)
    train: bool = True  # False: an evaluation of the base model only (Base, inference-only)


def _paper_methods() -> list[MethodSpec]:
    """The paper's baselines and ablations, plus iterated SPD (docs/method.md, "Baselines and
    ablations")."""
    unprojected = "generation.project=false"
    return [
        MethodSpec("base", train=False),
        MethodSpec("inference_only", ["evaluation.project=true"], train=False),
        MethodSpec("psr", [unprojected, "generation.top_p=1.0"]),
        MethodSpec("ssd", [unprojected]),  # as run by the SPD authors: T 0.7, top-p 0.9
        MethodSpec("ssd_original", [unprojected, "generation.temperature=1.5", "generation.top_k=20",
                                    "generation.top_p=0.95"]),  # the SSD paper's hot, truncated sampling
        MethodSpec("spd"),
        MethodSpec("spd_full_loss", ["task.calibration_loss=full"]),  # paper Table 5
        MethodSpec("spd_random", ["subspace.kind=random"]),  # same ranks, random directions
        MethodSpec("spd_k_only", ["subspace.mode=k_only"]),
        MethodSpec("spd_v_only", ["subspace.mode=v_only"]),
        MethodSpec("spd_iterated", ["run.rounds=2"]),  # its round 1 is the spd run, reused
    ]


@dataclass
class CompareConfig:
    """Methods x domains x seeds, each a pipeline run of a base config plus overrides."""
    name: str = "compare"
    output_dir: str = "runs"
    base_config: str = "configs/testbed.yaml"  # relative paths: to the repository root
    domain_configs: dict[str, str] = field(default_factory=dict)  # domain -> its own base config
    overrides: list[str] = field(default_factory=list)  # applied to every run
    domain_overrides: dict[str, list[str]] = field(default_factory=dict)  # domain -> its runs' overrides
    domains: list[str] = field(default_factory=lambda: ["math"])  # training (and calibration) domains
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44])  # sampling and fine-tuning seeds
    methods: list[MethodSpec] = field(default_factory=_paper_methods)
    subspace_domains: list[str] = field(default_factory=list)  # extra subspaces for principal angles
    # artifact store (relative: to output_dir); default <name>/store. Experiments that name the
    # same store reuse each other's artifacts wherever their configs agree
    store: str | None = None

    def __post_init__(self):
        check_folder_name("name", self.name, "output_dir")


def load_compare_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CompareConfig:
    """A comparison config (YAML) with dotted overrides, checked like the pipeline config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison config {path} does not exist; the shipped ones are in configs/compare/")
    data = _read_yaml(path)
    for item in overrides:
        data = deep_merge(data, _parse_override(item))
    cfg = _build(CompareConfig, data)
    if not cfg.methods:
        raise ConfigError(f"{path}: `methods` is empty; list at least one (name, overrides, train)")
    names = [m.name for m in cfg.methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: method names must be unique, got {names}")
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: SPDConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
