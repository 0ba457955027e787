"""The checks a run passes before any work (`check`): every setting that would fail only after
hours of work, or would write where it must not, is a `ConfigError` that names the key and the
fix. No Ray is started and DeepSpeed is not imported: the DeepSpeed configs of stages 1 and 3
are built dry by the stages' own builders, which stay the one source of their rules. What needs
a running cluster (GPU counts, storage shared across nodes) is checked once it runs.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from spd_ray.config import ConfigError, SPDConfig
from spd_ray.core.gguf import GGUFError, gguf_architecture, is_gguf
from spd_ray.core.modeling import config_kv_dim, load_tokenizer, num_layers, resolve_layers
from spd_ray.stages.calibrate import zero3_config
from spd_ray.stages.deepspeed import resolve_precision
from spd_ray.stages.finetune import training_deepspeed_config
from spd_ray.tasks.sandbox import SandboxUnavailable, require_isolation, warn_unisolated


def check(cfg: SPDConfig) -> None:
    """Problems that would surface only after hours of work, reported before any."""
    check_model(cfg)
    check_output_dir(cfg)
    check_settings(cfg)
    check_deepspeed(cfg)
    check_sandbox(cfg)


def check_model(cfg: SPDConfig) -> None:
    """The model folder (or hub id) exists and its tokenizer and config load: a wrong path, or
    a model with code of its own without model.trust_remote_code, fails here. A GGUF file:
    it exists, the gguf extra is installed and transformers can dequantize its architecture."""
    m = cfg.model
    if is_gguf(m.path):  # the file, its reader (the gguf extra) and its architecture
        try:
            gguf_architecture(m.path)
        except GGUFError as err:
            raise ConfigError(str(err)) from None
        return
    try:
        load_tokenizer(m.path, m.trust_remote_code)
        num_layers(m.path, m.trust_remote_code)
    except FileNotFoundError:
        raise ConfigError(f"model.path={m.path}: no such folder; set model.path=<a local HF "
                          "folder> or a hub id (with the hub reachable: HF_HUB_OFFLINE=0)"
                          ) from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):  # transformers' refusal names the argument
            raise
        raise ConfigError(f"model.path={m.path}: the model comes with code of its own, which "
                          "runs only with model.trust_remote_code=true: set it if you trust that "
                          "code, or choose another model") from None


def check_output_dir(cfg: SPDConfig) -> None:
    """`run.output_dir` is, or can become, a folder this process can write in, and the run's
    folder in it is not a file. Whatever the check creates it removes again: the run makes it."""
    where = Path(cfg.run.output_dir).expanduser()
    fix = "set run.output_dir=<a folder you can write to> (it is created if missing)"
    if where.exists() and not where.is_dir():
        raise ConfigError(f"run.output_dir={cfg.run.output_dir} is a file, not a folder; {fix}")
    made = [p for p in [where, *where.parents] if not p.exists()]  # deepest first
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as err:
        raise ConfigError(f"run.output_dir={cfg.run.output_dir} cannot be created or written in "
                          f"({type(err).__name__}: {err.strerror or err}); {fix}") from None
    finally:
        for path in made:
            with contextlib.suppress(OSError):  # another run's files in it meanwhile: it stays
                path.rmdir()
    if cfg.run_dir.exists() and not cfg.run_dir.is_dir():
        raise ConfigError(f"{cfg.run_dir} (run.output_dir/run.name) is a file, not a run folder; "
                          "set run.name=<another name>, or move the file away")


def check_settings(cfg: SPDConfig) -> None:
    """Values each valid alone that cannot work together, or not with this model."""
    if cfg.run.rounds < 0:
        raise ConfigError(f"run.rounds={cfg.run.rounds}: the rounds of SPD to run, at least 1 "
                          "(0: evaluate the base model only)")
    if cfg.run.rounds > 1 and cfg.finetune.method == "lora" and cfg.finetune.export != "merged":
        raise ConfigError("run.rounds > 1 trains each round from the previous round's model, which "
                          "must be a full model: set finetune.export=merged")
    if cfg.subspace.rank_mode == "fixed" and cfg.subspace.rank is None:
        raise ConfigError("subspace.rank_mode=fixed needs subspace.rank (e.g. subspace.rank=16)")
    m = cfg.model
    width = config_kv_dim(m.path, m.trust_remote_code)
    if cfg.subspace.rank_mode == "fixed" and not 1 <= cfg.subspace.rank <= width:
        raise ConfigError(f"subspace.rank={cfg.subspace.rank}: the model's k_proj/v_proj outputs "
                          f"have {width} dimensions, so the rank must be 1..{width}")
    try:
        resolve_layers(num_layers(m.path, m.trust_remote_code), cfg.calibration.layers)
    except ValueError as err:
        raise ConfigError(f"calibration.layers={cfg.calibration.layers}: {err}") from None
    if cfg.task.n_calibration < 1 and (cfg.generation.project or cfg.evaluation.project):
        raise ConfigError(f"task.n_calibration={cfg.task.n_calibration}: the capability subspace "
                          "needs labeled calibration examples (the paper uses 50)")
    if cfg.task.n_train_prompts < 1:
        raise ConfigError(f"task.n_train_prompts={cfg.task.n_train_prompts}: self-generation needs "
                          "training prompts (e.g. task.n_train_prompts=1000)")
    g = cfg.generation
    if g.batch_size < 1 or g.batches_per_call < 1:
        raise ConfigError(f"generation.batch_size={g.batch_size}, generation.batches_per_call="
                          f"{g.batches_per_call}: both must be at least 1 (rows decoding at once, "
                          "batches of prompts per replica call)")
    if cfg.subspace.kind == "random" and not cfg.generation.project:
        raise ConfigError("subspace.kind=random only matters with generation.project=true")
    t = cfg.task
    if t.source == "files" and cfg.evaluation.domains:
        raise ConfigError(f"evaluation.domains={cfg.evaluation.domains} does not apply to "
                          "task.source=files: its evaluation splits are task.files.eval; remove "
                          "evaluation.domains")


def check_deepspeed(cfg: SPDConfig) -> None:
    """The DeepSpeed configs of stage 3 and of ZeRO-3 calibration, built dry by the stages'
    builders: every combination they refuse is refused here, in their words."""
    ft = cfg.finetune
    try:
        training_deepspeed_config(ft, resolve_precision(cfg.model.dtype, ft.use_gpu))
        if cfg.calibration.zero_stage == 3:
            zero3_config(cfg.model, cfg.calibration, cfg.calibration.num_workers)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_sandbox(cfg: SPDConfig) -> None:
    """Model-written code will run: the sandbox can isolate it, or the user chose not to."""
    t = cfg.task
    scorers = {t.files.scorer_of(split) for split in t.files.eval}
    files_run_code = t.source == "files" and "asserts" in scorers
    if files_run_code or "code" in {t.domain, *(cfg.evaluation.domains or [])}:
        if cfg.evaluation.sandbox == "process":
            warn_unisolated()
        else:
            try:
                require_isolation()
            except SandboxUnavailable as err:
                raise ConfigError(str(err)) from None
