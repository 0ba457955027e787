"""The SPD run in the paper's order, on Ray (jobs/spd.py runs it; jobs/compare.py runs it per
method): `run_pipeline` evaluates the base model, then per round `spd_round` reads as Fig. 2:
stage 1 (`capability_subspace`), stage 2 (`self_generation`), stage 3 (`distillation`) and the
evaluation. Each of them is an artifact of the run directory (made or reused) and a start and
an end line on the console (`spd_ray.console`) with its key figures; the work itself is in
`stage1_subspace`, `stage2_generate`, `corpus_quality` and `stage3_finetune`. `check` refuses
impossible configs before any work, `connect_ray` joins or starts Ray.

Importing this module sets the offline defaults (`spd_ray.offline_by_default`) before anything
reads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from pathlib import Path

import ray

from spd_ray import OFFLINE_DEFAULTS, artifacts, console, data, offline_by_default
from spd_ray.config import ConfigError, SPDConfig
from spd_ray.core.modeling import config_kv_dim, load_tokenizer, num_layers, resolve_layers
from spd_ray.core.spans import calibration_batches
from spd_ray.core.subspace import CapabilitySubspace, build_subspace, random_subspace
from spd_ray.local_ray import start_local_ray
from spd_ray.stages.calibrate import distributed_kv_stats
from spd_ray.stages.evaluate import evaluate_on_ray
from spd_ray.stages.finetune import HISTORY_FILE, epoch_plan, finetune_on_ray
from spd_ray.stages.generate import generate_dataset
from spd_ray.tasks.evaluation import score
from spd_ray.tasks.labels import LabelReport, label_report
from spd_ray.tasks.sandbox import SandboxUnavailable, require_isolation, warn_unisolated
from spd_ray.tasks.task import Task, load_task
from spd_ray.tracking import Tracker

offline_by_default()  # none of the imports above has read them (tests/test_layers.py)


def stage1_subspace(cfg: SPDConfig, tokenizer, calibration, out: Path, tracker: Tracker) -> None:
    """Calibration gradients on Ray workers -> summed statistics -> capability subspace."""
    loss_kind = cfg.task.calibration_loss
    batches, skipped = calibration_batches(
        tokenizer, [it.text for it in calibration], [it.correctness_spans(loss_kind) for it in calibration],
        batch_size=cfg.calibration.batch_size,
        max_length=cfg.calibration.max_length, task=cfg.task.domain)
    layers = resolve_layers(num_layers(cfg.model.path, cfg.model.trust_remote_code), cfg.calibration.layers)
    stats, loss, nodes = distributed_kv_stats(cfg, batches, layers)
    s = cfg.subspace
    subspace = build_subspace(stats, rank_mode=s.rank_mode, rank=s.rank, energy=s.energy,
                              center=s.center, meta={
                                  "model": cfg.model.path, "layers": layers, "calibration_loss": loss_kind,
                                  "n_calibration": len(calibration) - skipped, "skipped": skipped,
                                  "calibration_hash": data.fingerprint([it.text for it in calibration]),
                                  "mean_calibration_loss": loss, "worker_nodes": nodes})
    tracker.log({"stage1/calibration_loss": loss, "stage1/skipped": skipped})
    tracker.spectra(subspace)
    if s.kind == "random":  # the ablation: same ranks, random directions
        subspace = random_subspace(subspace, s.random_seed)
    subspace.save(out)


def stage2_generate(cfg: SPDConfig, prompts: list[str], subspace_dir: Path | None, out: Path,
                    tracker: Tracker) -> dict:
    """Raw completions from the actor pool, K/V projected onto the capability subspace
    (unprojected for the PSR / SSD baselines: generation.project=false), written to `out` as
    they arrive; rows already there (a killed run's) are not generated again. Returns the
    corpus's figures."""
    g = cfg.generation
    start = time.time()
    rows = data.sampling_rows(prompts, g.n_samples, g.seed)
    out.mkdir(parents=True, exist_ok=True)
    done = data.written_ids(out)
    todo = [r for r in rows if r["id"] not in done]
    if done:
        console.log(f"  {len(done)} of {len(rows)} rows already written; generating the other {len(todo)}")
    if todo:
        ds = generate_dataset(ray.data.from_items(todo), cfg.model, g, subspace_dir=subspace_dir,
                              mode=cfg.subspace.mode, apply=cfg.subspace.apply)
        with console.progress("generating", len(rows), done=len(done), unit="rows") as bar:
            batches = ds.iter_batches(batch_size=g.batch_size, batch_format="pyarrow")
            data.write_parts(bar.count(batches, lambda batch: batch.num_rows), out,
                             rows_per_part=g.batch_size * max(1, g.replicas_max))
    written = data.written_ids(out)
    if written != {r["id"] for r in rows}:  # every id exactly once (a part holds each row once)
        raise RuntimeError(f"stage 2 wrote {len(written)} of {len(rows)} rows to {out}")
    kept = data.read_corpus(out)  # on the driver, in one read (see read_corpus)
    n_kept = kept.num_rows
    if not n_kept:  # the rows stay written: a rerun with another generation config starts afresh
        raise RuntimeError(f"stage 2: all {len(rows)} completions are empty, nothing to train on; "
                           f"check generation.max_new_tokens ({g.max_new_tokens}) and the model's prompts")
    if n_kept < len(rows):
        console.warn(f"stage 2: {len(rows) - n_kept} of {len(rows)} completions are empty; "
                     "they are left out of training")
    chars = [len(c) for c in kept.column("completion").to_pylist()]
    stats = {"stage2/completions": n_kept, "stage2/dropped_empty": len(rows) - n_kept,
             "stage2/samples_per_s": len(todo) / (time.time() - start),
             "stage2/mean_completion_chars": sum(chars) / n_kept}
    tracker.log(stats)
    tracker.table("stage2/samples", kept.select(["id", "prompt", "completion"]).slice(0, 32).to_pylist())
    return stats


def training_corpus(generations: Path) -> ray.data.Dataset:
    """The rows that train: all but empty completions (`data.read_corpus`, read on the driver
    and put in the object store, where stage 3 takes them)."""
    return ray.data.from_arrow(data.read_corpus(generations))


def corpus_quality(cfg: SPDConfig, train_items, generations: Path, out: Path) -> None:
    """How often the raw corpus is right before any training (paper Table 3): a diagnostic, the
    only use of the training prompts' answers; nothing is filtered by it. None where the prompts
    come without answers (task.source=files)."""
    rows = data.read_corpus(generations).select(["id", "completion"]).to_pylist()
    items = [train_items[int(r["id"].split("-")[0])] for r in rows]
    accuracy = None
    if items and items[0].metric:
        accuracy = sum(score(items, [r["completion"] for r in rows], cfg.evaluation)) / len(rows)
    out.write_text(json.dumps({"accuracy": accuracy, "n": len(rows),
                               "mean_chars": sum(len(r["completion"]) for r in rows) / max(1, len(rows))}))


def stage3_finetune(cfg: SPDConfig, generations: Path, n_rows: int, out: Path, resume_dir: Path,
                    tracker: Tracker) -> None:
    """Ray Train + DeepSpeed on prompt + completion (`n_rows` of them), starting from the
    ORIGINAL weights (for round k of iterated SPD: round k-1's model); checkpoints in
    `resume_dir`. The bar follows the optimizer steps (`training_step`)."""
    run_name = f"{cfg.run.name}-finetune"
    total = epoch_plan(n_rows, cfg.finetune.num_workers, cfg.finetune)["total_steps"]
    progress_file = resume_dir / "progress.json"
    progress_file.unlink(missing_ok=True)  # a killed run's: the checkpoint says where training resumes
    read = training_step(resume_dir / run_name, progress_file)
    with console.progress("training", total, done=read() or 0, unit="steps") as bar:
        bar.poll(read)
        finetune_on_ray(cfg.finetune, cfg.model.path, training_corpus(generations),
                        output_dir=out, run_name=run_name,
                        storage_path=str(resume_dir), dtype=cfg.model.dtype, wandb_run_id=tracker.run_id,
                        on_metrics=lambda entry: tracker.log({f"stage3/{k}": v for k, v in entry.items()}),
                        progress_file=progress_file)


def training_step(train_dir: Path, progress_file: Path):
    """A reader of stage 3's latest optimizer step (None while there is none): the step rank 0
    writes to `progress_file` after each optimizer step (when the loop does), else that of the
    latest checkpoint Ray Train has recorded in `train_dir`. A step lower than the last one read
    means the worker group was restarted from a checkpoint: a warning says so."""
    last = [0]

    def read() -> int | None:
        step = None
        try:
            if progress_file.exists():
                step = int(json.loads(progress_file.read_text())["step"])
            else:
                snapshot = train_dir / "checkpoint_manager_snapshot.json"  # Ray Train's own record
                if snapshot.exists():
                    step = int(json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"])
        except (OSError, ValueError, KeyError, TypeError):  # caught mid-write, or not (yet) the format
            return None
        if step is not None:
            if step < last[0]:
                console.warn(f"stage 3: training went back from step {last[0]} to {step}: the worker "
                             "group was restarted from its last checkpoint (the driver log says why)")
            last[0] = step
        return step

    return read


def training_figures(model_dir: Path) -> str:
    """Steps and loss of a fine-tuned model, from the history stage 3 wrote beside it."""
    try:
        history = [json.loads(line) for line in (model_dir / HISTORY_FILE).read_text().splitlines() if line]
    except OSError:
        return ""
    if not history:
        return ""
    steps = history[-1]["step"]
    return f"{steps} step{'' if steps == 1 else 's'}, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}"


def evaluate(cfg: SPDConfig, model_path: str, splits, out: Path, subspace_dir: Path | None = None) -> None:
    model = dataclasses.replace(cfg.model, path=model_path)
    out.write_text(json.dumps(evaluate_on_ray(model, cfg.generation, cfg.evaluation, splits,
                                              subspace_dir, cfg.subspace.mode, cfg.subspace.apply),
                              indent=1))


def scores(metrics: dict[str, float]) -> str:
    """An evaluation on one line: each split's accuracy, with its reference NLL where there is one."""
    parts: dict[str, list[str]] = {}
    for key, value in metrics.items():
        split, _, kind = key.rpartition("/")
        parts.setdefault(split, []).append(f"{value:.3f}" if kind == "accuracy" else f"{kind} {value:.3f}")
    return ", ".join(f"{split} {' '.join(vals)}" for split, vals in parts.items())


def run_pipeline(cfg: SPDConfig, task: Task, run: artifacts.RunDir, tracker: Tracker, train: bool = True) -> dict:
    """Evaluation of the base model, then `run.rounds` rounds of SPD on `task`, each from the
    model the round before made. `train=False` stops after stage 1 (for the inference-only
    baseline, evaluation.project). Returns every evaluation, each round's subspace folder and the
    quality of its raw corpus."""
    results = {"eval": {}, "corpus": {}, "subspaces": {}}
    results["eval"]["base"] = evaluation(cfg, run, "eval_base.json", "evaluation of the base model",
                                         "greedy, projection off", cfg.model.path, task.eval_splits)
    model_path = cfg.model.path
    for r in range(1, cfg.run.rounds + 1):
        rcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model_path))
        model_path = spd_round(rcfg, r, run, tracker, task, results, train)
        if not train:
            break
    tracker.log({f"eval/{m}/{k}": v for m, vals in results["eval"].items() for k, v in vals.items()})
    return results


def spd_round(cfg: SPDConfig, r: int, run: artifacts.RunDir, tracker: Tracker, task: Task,
              results: dict, train: bool) -> str:
    """One round of the paper's Fig. 2 on `cfg.model` (round k > 1: round k-1's model): returns
    the trained model's path."""
    prefix, name = ("", "spd") if r == 1 else (f"round{r}/", f"spd_round{r}")
    subspace_dir = None
    if (train and cfg.generation.project) or cfg.evaluation.project:
        # 1-2. calibration gradients of the correctness spans -> the capability subspace
        subspace_dir = capability_subspace(cfg, run, task, prefix, tracker)
        results["subspaces"][r] = str(subspace_dir)
    if cfg.evaluation.project and r == 1:
        results["eval"]["base+projection"] = evaluation(
            cfg, run, "eval_projected.json", "evaluation of the base model with the projection on",
            "the inference-only baseline", cfg.model.path, task.eval_splits, subspace_dir)
    if not train:
        return cfg.model.path
    # 3. self-generation with K and V projected onto it
    gen_dir, results["corpus"][r] = self_generation(
        cfg, run, task, subspace_dir if cfg.generation.project else None, prefix, tracker)
    # 4. distillation: the original model fine-tuned on its own projected completions
    model_dir = distillation(cfg, run, gen_dir, results["corpus"][r]["n"], prefix, tracker)
    # 5. evaluation: greedy, projection off
    results["eval"][name] = evaluation(cfg, run, prefix + "eval_spd.json", f"evaluation of round {r}'s model",
                                       "greedy, projection off", str(model_dir), task.eval_splits)
    return str(model_dir)


def capability_subspace(cfg: SPDConfig, run: artifacts.RunDir, task: Task, prefix: str, tracker: Tracker) -> Path:
    """Stage 1 as an artifact and a stage of the console: the subspace folder."""
    with console.stage("stage 1", f"capability subspace of {cfg.model.path} from "
                       f"{len(task.calibration)} calibration examples on "
                       f"{cfg.calibration.num_workers} workers") as st:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
        subspace_dir = run.stage(prefix + "subspace", lambda out: stage1_subspace(
            cfg, tokenizer, task.calibration, out, tracker), cfg)
        subspace = CapabilitySubspace.load(subspace_dir)
        st.summary = ", ".join(f"L{layer}.{kind} rank {b.shape[1]} energy {subspace.energy[(layer, kind)]:.3f}"
                               for (layer, kind), b in sorted(subspace.bases.items()))
    return subspace_dir


def self_generation(cfg: SPDConfig, run: artifacts.RunDir, task: Task, subspace_dir: Path | None,
                    prefix: str, tracker: Tracker) -> tuple[Path, dict]:
    """Stage 2 and the raw corpus's quality, as artifacts and a stage of the console: the
    generations folder and the corpus figures."""
    kind = "projected" if subspace_dir is not None else "unprojected"
    n_rows = len(task.train_prompts) * cfg.generation.n_samples
    with console.stage("stage 2", f"{kind} self-generation of {n_rows} completions "
                       f"on {cfg.generation.replicas_min}-{cfg.generation.replicas_max} replicas") as st:
        stats: dict = {}
        gen_dir = run.stage(prefix + "generations", lambda out: stats.update(stage2_generate(
            cfg, task.train_prompts, subspace_dir, out, tracker)), cfg, resumable=True)
        corpus = json.loads(run.stage(prefix + "corpus.json", lambda out: corpus_quality(
            cfg, task.train_items, gen_dir, out), cfg).read_text())
        made = (f"{stats['stage2/samples_per_s']:.1f} samples/s, " if stats else "")
        quality = ("no answers to score it by" if corpus["accuracy"] is None else
                   f"raw corpus accuracy {corpus['accuracy']:.3f} (a diagnostic: nothing is filtered)")
        st.summary = f"{corpus['n']} completions kept of {n_rows}, {made}mean {corpus['mean_chars']:.0f} chars; {quality}"
    return gen_dir, corpus


def distillation(cfg: SPDConfig, run: artifacts.RunDir, gen_dir: Path, n_rows: int, prefix: str,
                 tracker: Tracker) -> Path:
    """Stage 3 as an artifact and a stage of the console: the fine-tuned model's folder."""
    ft = cfg.finetune
    with console.stage("stage 3", f"fine-tuning ({ft.method}, ZeRO-{ft.zero_stage}) on {ft.num_workers} "
                       f"workers, {n_rows} rows x {ft.epochs:g} epoch{'' if ft.epochs == 1 else 's'}") as st:
        model_dir = run.stage(prefix + "model", lambda out: stage3_finetune(
            cfg, gen_dir, n_rows, out, run.resume_dir(prefix + "model", cfg), tracker), cfg)
        st.summary = training_figures(model_dir)
    return model_dir


def evaluation(cfg: SPDConfig, run: artifacts.RunDir, name: str, title: str, how: str, model_path: str,
               splits, subspace_dir: Path | None = None) -> dict[str, float]:
    """The evaluation artifact `name` (made or reused) as a stage of the console."""
    n = sum(len(items) for items in splits.values())
    with console.stage(title, f"{how}, {n} items in {len(splits)} splits") as st:
        metrics = json.loads(run.stage(name, lambda out: evaluate(
            cfg, model_path, splits, out, subspace_dir), cfg).read_text())
        st.summary = scores(metrics)
    return metrics


def prepare(cfg: SPDConfig) -> tuple[Task, LabelReport]:
    """Everything that can be wrong before any work: the config (`check`), the task's data
    (`load_task`: calibration examples, training prompts, evaluation splits) and, where stage 1
    will run, its calibration labels (the report shows what the loss will look at)."""
    check(cfg)
    task = load_task(cfg)
    labels = label_report(cfg, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code), task.calibration)
    if cfg.generation.project or cfg.evaluation.project:
        labels.require_labels(cfg.task.domain)
    return task, labels


def check(cfg: SPDConfig) -> None:
    """Problems that would surface only after hours of work, reported before any."""
    load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)  # a wrong model path fails here
    if cfg.run.rounds < 1:
        raise ConfigError(f"run.rounds={cfg.run.rounds}: need at least 1 round")
    if cfg.run.rounds > 1 and cfg.finetune.method == "lora" and cfg.finetune.export != "merged":
        raise ConfigError("run.rounds > 1 trains each round from the previous round's model, which "
                          "must be a full model: set finetune.export=merged")
    if cfg.subspace.rank_mode == "fixed" and cfg.subspace.rank is None:
        raise ConfigError("subspace.rank_mode=fixed needs subspace.rank (e.g. subspace.rank=16)")
    width = config_kv_dim(cfg.model.path, cfg.model.trust_remote_code)
    if cfg.subspace.rank_mode == "fixed" and not 1 <= cfg.subspace.rank <= width:
        raise ConfigError(f"subspace.rank={cfg.subspace.rank}: the model's k_proj/v_proj outputs have "
                          f"{width} dimensions, so the rank must be 1..{width}")
    try:
        resolve_layers(num_layers(cfg.model.path, cfg.model.trust_remote_code), cfg.calibration.layers)
    except ValueError as err:
        raise ConfigError(f"calibration.layers={cfg.calibration.layers}: {err}") from None
    if cfg.task.n_calibration < 1 and (cfg.generation.project or cfg.evaluation.project):
        raise ConfigError(f"task.n_calibration={cfg.task.n_calibration}: the capability subspace needs "
                          "labeled calibration examples (the paper uses 50)")
    if cfg.task.n_train_prompts < 1:
        raise ConfigError(f"task.n_train_prompts={cfg.task.n_train_prompts}: self-generation needs "
                          "training prompts (e.g. task.n_train_prompts=1000)")
    if cfg.subspace.kind == "random" and not cfg.generation.project:
        raise ConfigError("subspace.kind=random only matters with generation.project=true")
    t = cfg.task
    if t.source == "files" and cfg.evaluation.domains:
        raise ConfigError(f"evaluation.domains={cfg.evaluation.domains} does not apply to task.source=files: "
                          "its evaluation splits are task.files.eval; remove evaluation.domains")
    files_run_code = t.source == "files" and "asserts" in {t.files.scorer_of(split) for split in t.files.eval}
    if files_run_code or "code" in {t.domain, *(cfg.evaluation.domains or [])}:  # model-written code will run
        if cfg.evaluation.sandbox == "process":
            warn_unisolated()
        else:
            try:
                require_isolation()
            except SandboxUnavailable as err:
                raise ConfigError(str(err)) from None


def connect_ray(cfg: SPDConfig) -> bool:
    """Join the cluster this job was submitted to (or run.ray_address); else start a local Ray.
    False if Ray was connected already (by the caller, who then ends it).

    The local Ray has its dashboard (on 127.0.0.1), whose HTTP server is also Ray's State API:
    Ray Train polls it every second of stage 3 to tell whether its controller is alive (its
    PlacementGroupCleaner; without the API it warns each time that it cannot). The workers are
    told its address (RAY_API_SERVER_ADDRESS): they would look it up among the Ray instances
    running on this machine, and give up where there are several. Ray Data's own progress bars
    are off unless run.verbose: the console has one bar per long stage."""
    if not cfg.run.verbose:
        ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return False
    env = {"env_vars": {name: os.environ[name] for name in OFFLINE_DEFAULTS}}
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env)
        return True
    with socket.socket() as sock:  # a free port (the default, 8265, may be another Ray's)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    # more logical CPUs than cores, so the stages' actors and tasks never starve each other
    start_local_ray(num_cpus=max(4, os.cpu_count() or 1), dashboard_port=port, runtime_env=env)
    return True


@contextlib.contextmanager
def ray_connection(cfg: SPDConfig):
    """`connect_ray` for the length of a job; Ray is left at its end (a local one ends), before
    the job's console session does, so no late output of the workers reaches the console."""
    connected = connect_ray(cfg)
    try:
        yield
    finally:
        if connected:
            ray.shutdown()


def ray_logs() -> str:
    """Where Ray keeps this session's logs on this node (every worker's output among them), and
    its dashboard's address when it has one."""
    try:
        where = ray._private.worker._global_node.get_logs_dir_path()
        url = ray._private.worker.get_dashboard_url()
    except AttributeError:  # not connected, or Ray moved them
        return "/tmp/ray/session_latest/logs"
    return f"{where} (dashboard http://{url})" if url else where
