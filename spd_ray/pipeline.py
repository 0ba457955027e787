"""The SPD run in the paper's order, on Ray (jobs/spd.py runs it; jobs/compare.py runs it per
method): `run_pipeline` evaluates the base model, then per round `spd_round` reads as the paper's
Fig. 2: stage 1, the capability subspace; stage 2, projected self-generation; stage 3,
distillation; then the evaluation. Each is an artifact of the run directory, made or reused
(`RunDir.stage`: same config and inputs, content checked), and a stage of the console with its
key figures; the work itself is each stage's driver in `spd_ray.stages`. `prepare` refuses what
cannot work before any work.

Importing this module sets the offline defaults (`spd_ray.offline_by_default`) before anything
reads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spd_ray import artifacts, checks, console, data, offline_by_default
from spd_ray.config import SPDConfig
from spd_ray.core.gguf import convert_gguf, is_gguf
from spd_ray.core.modeling import load_tokenizer, resolve_dtype
from spd_ray.stages.calibrate import SubspaceResult, capability_subspace
from spd_ray.stages.evaluate import CorpusQuality, EvalResult, corpus_quality, evaluate_on_ray
from spd_ray.stages.finetune import FinetuneResult, distill
from spd_ray.stages.generate import GenerationResult, Projection, context_length, self_generate
from spd_ray.tasks.labels import LabelReport, label_report
from spd_ray.tasks.task import Task, load_task
from spd_ray.tracking import Tracker

offline_by_default()  # none of the imports above has read them (tests/test_layers.py)

# a converted GGUF model's weights: half of fp32's size, and bf16's rounding (2^-9 of a value) is
# far below the quantization step of the usual GGUF files (Q8: 2^-7 of a block's range, Q4: 2^-4)
GGUF_DTYPE = torch.bfloat16


@dataclass
class RoundResult:
    """One round of SPD: its capability subspace (None for an unprojected baseline), the base
    model's evaluation with the projection on (round 1 with evaluation.project: the
    inference-only baseline), the raw corpus's quality, the fine-tuned model and its evaluation
    (None where the run stops before training)."""
    round: int
    subspace: SubspaceResult | None = None
    projected: EvalResult | None = None
    corpus: CorpusQuality | None = None
    model: FinetuneResult | None = None
    evaluation: EvalResult | None = None
    # the base model evaluated in float32 too, where this round's model is (its update would not
    # survive model.dtype): the like-for-like reference of its evaluation
    base_float32: EvalResult | None = None

    @property
    def name(self) -> str:
        return "spd" if self.round == 1 else f"spd_round{self.round}"


@dataclass
class PipelineResult:
    """A run: the base model's evaluation, then each round's."""
    base: EvalResult
    rounds: list[RoundResult] = field(default_factory=list)

    def results(self) -> dict[str, EvalResult]:
        """Every evaluation by name: base, base+projection, spd, spd_round2, ...; and
        `base_float32` where a round's model was evaluated in float32 (`reference`)."""
        out = {"base": self.base}
        for r in self.rounds:
            if r.base_float32:
                out["base_float32"] = r.base_float32
            if r.projected:
                out["base+projection"] = r.projected
            if r.evaluation:
                out[r.name] = r.evaluation
        return out

    def reference(self) -> str:
        """The evaluation the last round's is compared with: the base model in the same dtype."""
        return "base_float32" if any(r.base_float32 for r in self.rounds) else "base"

    def evaluations(self) -> dict[str, dict[str, float]]:
        """Every evaluation's metrics by name (`results`)."""
        return {name: result.metrics for name, result in self.results().items()}

    def to_dict(self) -> dict:
        """What metrics.json holds: the evaluations, each round's corpus, fine-tuning (the
        exported dtype, the share of the update its weights keep, the rows cut to
        finetune.max_length) and subspace folder."""
        return {"eval": self.evaluations(),
                "corpus": {r.round: dataclasses.asdict(r.corpus) for r in self.rounds if r.corpus},
                "finetune": {r.round: r.model.to_dict() for r in self.rounds if r.model},
                "subspaces": {r.round: str(r.subspace.path) for r in self.rounds if r.subspace}}


def run_pipeline(cfg: SPDConfig, task: Task, run: artifacts.RunDir, tracker: Tracker,
                 train: bool = True) -> PipelineResult:
    """Evaluation of the base model, then `run.rounds` rounds of SPD on `task`, each from the
    model the round before made. `train=False` stops after stage 1 (for the inference-only
    baseline, evaluation.project)."""
    result = PipelineResult(evaluation(cfg, run, "eval_base.json", "evaluation of the base model",
                                       "greedy, projection off", task.eval_splits))
    model = cfg.model
    for r in range(1, cfg.run.rounds + 1):
        rnd = spd_round(dataclasses.replace(cfg, model=model), r, run, task, tracker, train)
        result.rounds.append(rnd)
        if not train:
            break
        model = dataclasses.replace(cfg.model, path=str(rnd.model.path))
        kept = rnd.model.export.get("update_kept_in_model_dtype", 1.0)
        if r < cfg.run.rounds and kept < 1.0:  # the next round loads it in model.dtype
            console.warn(f"round {r + 1} starts from round {r}'s model in model.dtype, which keeps "
                         f"{kept:.1%} of round {r}'s update (metrics.json: finetune.{r}.export)")
    tracker.log({f"eval/{m}/{k}": v for m, vals in result.evaluations().items() for k, v in vals.items()})
    return result


def spd_round(cfg: SPDConfig, r: int, run: artifacts.RunDir, task: Task, tracker: Tracker,
              train: bool) -> RoundResult:
    """One round of the paper's Fig. 2 on `cfg.model` (round k > 1: round k-1's model)."""
    at = "" if r == 1 else f"round{r}/"  # where the round's artifacts are in the run directory
    base = [] if r == 1 else ["model" if r == 2 else f"round{r - 1}/model"]  # the model it starts from
    out = RoundResult(r)
    if (train and cfg.generation.project) or cfg.evaluation.project:
        # 1-2. calibration gradients of the correctness spans -> the capability subspace
        out.subspace = subspace_stage(cfg, run, task, at, tracker, base)
    projection = Projection.of(out.subspace and out.subspace.path, cfg.subspace)
    if cfg.evaluation.project and r == 1:
        out.projected = evaluation(cfg, run, "eval_projected.json",
                                   "evaluation of the base model with the projection on",
                                   "the inference-only baseline", task.eval_splits, projection,
                                   inputs=["subspace"])
    if not train:
        return out
    # 3. self-generation with K and V projected onto it (unprojected: the PSR / SSD baselines)
    if not cfg.generation.project:
        projection = None
    made_from = base + ([at + "subspace"] if projection else [])
    generations, out.corpus = generation_stage(cfg, run, task, projection, at, tracker, made_from)
    # 4. distillation: the original model fine-tuned on its own projected completions
    out.model = distillation_stage(cfg, run, generations, at, tracker, base + [at + "generations"])
    # 5. evaluation: greedy, projection off, in the dtype the model was saved in (float32 where
    # model.dtype would round the update away: FinetuneConfig.export_dtype)
    export = out.model.export
    if export.get("dtype") == "float32" and export.get("update_kept_in_model_dtype", 1.0) < 1.0:
        console.warn(f"round {r}'s model keeps {export['update_kept_in_model_dtype']:.1%} of its update in "
                     "model.dtype, so it was saved and is evaluated in float32: twice the memory of "
                     "bf16 per replica (30 GB for a 7B model); on smaller GPUs set "
                     "finetune.export_dtype=model")
    out.evaluation = evaluation(cfg, run, at + "eval_spd.json", f"evaluation of round {r}'s model",
                                "greedy, projection off", task.eval_splits,
                                model_path=out.model.path, dtype=out.model.export.get("dtype"),
                                inputs=[at + "model"])
    if export.get("dtype") == "float32" and resolve_dtype(cfg.model.dtype, cfg.model.device) != torch.float32:
        # the base model in the same precision, so that the difference is the training's alone
        fp32 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="float32"))
        out.base_float32 = evaluation(fp32, run, "eval_base_float32.json",
                                      "evaluation of the base model in float32",
                                      "greedy, projection off, as round's model is", task.eval_splits)
    return out


def subspace_stage(cfg: SPDConfig, run: artifacts.RunDir, task: Task, at: str, tracker: Tracker,
                   inputs: list[str]) -> SubspaceResult:
    """Stage 1 as an artifact and a stage of the console."""
    made = None
    with console.stage("stage 1", f"capability subspace of {cfg.model.path} from "
                       f"{len(task.calibration)} calibration examples on "
                       f"{cfg.calibration.num_workers} workers") as st:
        with run.stage(at + "subspace", cfg, inputs=inputs) as art:
            if art.todo:
                made = capability_subspace(cfg.model, cfg.calibration, cfg.subspace, task.calibration,
                                           cfg.task.calibration_loss, art.path)
                meta = made.subspace.meta
                tracker.log({"stage1/calibration_loss": meta["mean_calibration_loss"],
                             "stage1/skipped": meta["skipped"]})
                tracker.spectra(made.subspace)
        result = dataclasses.replace(made, path=art.path) if made else SubspaceResult.load(art.path)
        st.summary = result.summary()
    return result


def generation_stage(cfg: SPDConfig, run: artifacts.RunDir, task: Task, projection: Projection | None,
                     at: str, tracker: Tracker, inputs: list[str]
                     ) -> tuple[GenerationResult, CorpusQuality]:
    """Stage 2 and the raw corpus's quality (paper Table 3), as artifacts and a stage of the
    console."""
    kind = "projected" if projection else "unprojected"
    n_rows = len(task.train_prompts) * cfg.generation.n_samples
    made = None
    with console.stage("stage 2", f"{kind} self-generation of {n_rows} completions on "
                       f"{cfg.generation.replicas_min}-{cfg.generation.replicas_max} replicas") as st:
        with run.stage(at + "generations", cfg, inputs=inputs, resumable=True,
                       digest=data.corpus_digest) as art:
            if art.todo:
                made = self_generate(cfg.model, cfg.generation, task.train_prompts, art.path, projection)
                tracker.log({"stage2/completions": made.kept, "stage2/dropped_empty": made.rows - made.kept,
                             "stage2/samples_per_s": made.samples_per_s,
                             "stage2/mean_completion_chars": made.mean_chars})
                tracker.table("stage2/samples", made.samples)
        result = dataclasses.replace(made, path=art.path) if made else GenerationResult.load(art.path, n_rows)
        with run.stage(at + "corpus.json", cfg, inputs=[at + "generations"]) as quality:
            if quality.todo:
                corpus_quality(task.train_items, result.path, cfg.evaluation, quality.path)
        corpus = CorpusQuality.load(quality.path)
        st.summary = f"{result.summary()}; {corpus.summary()}"
    return result, corpus


def distillation_stage(cfg: SPDConfig, run: artifacts.RunDir, generations: GenerationResult,
                       at: str, tracker: Tracker, inputs: list[str]) -> FinetuneResult:
    """Stage 3 as an artifact and a stage of the console."""
    ft, n_rows = cfg.finetune, generations.kept
    made = None
    with console.stage("stage 3", f"fine-tuning ({ft.method}, ZeRO-{ft.zero_stage}) on {ft.num_workers} "
                       f"workers, {n_rows} rows x {ft.epochs:g} epoch{'' if ft.epochs == 1 else 's'}") as st:
        with run.stage(at + "model", cfg, inputs=inputs) as art:
            if art.todo:
                made = distill(cfg.model, ft, generations.path, n_rows, art.path,
                               run.resume_dir(at + "model", cfg, inputs),
                               run_name=f"{cfg.run.name}-finetune", wandb_run_id=tracker.run_id)
                for entry in made.history:
                    tracker.log({f"stage3/{k}": v for k, v in entry.items()})
        result = dataclasses.replace(made, path=art.path) if made else FinetuneResult.load(art.path)
        st.summary = result.summary()
    return result


def evaluation(cfg: SPDConfig, run: artifacts.RunDir, name: str, title: str, how: str, splits,
               projection: Projection | None = None, *, model_path: Path | None = None,
               dtype: str | None = None, inputs: list[str] = ()) -> EvalResult:
    """The evaluation artifact `name` of `cfg.model` (or of the model at `model_path`, made from
    it, run in `dtype` where given: the dtype it was saved in) as a stage of the console."""
    model = cfg.model if model_path is None else dataclasses.replace(
        cfg.model, path=str(model_path), dtype=dtype or cfg.model.dtype)
    n = sum(len(items) for items in splits.values())
    with console.stage(title, f"{how}, {n} items in {len(splits)} splits") as st:
        with run.stage(name, cfg, inputs=inputs) as art:
            if art.todo:
                evaluate_on_ray(model, cfg.evaluation, splits, art.path, cfg.generation, projection)
        result = EvalResult.load(art.path)
        st.summary = result.summary()
    return result


def prepare(cfg: SPDConfig) -> tuple[SPDConfig, Task, LabelReport]:
    """Everything that can be wrong before any work: the config (`checks.check`), then, with the
    model as a folder (`base_model`), the task's data (`load_task`: calibration examples,
    training prompts, evaluation splits), where stage 1 will run, its calibration labels (the
    report shows what the loss will look at), and the longest prompts' context
    (`stages.generate.context_length`). Returns the config the run uses (a GGUF model.path
    replaced by its folder), the task and the label report."""
    checks.check(cfg)
    cfg = base_model(cfg)
    task = load_task(cfg)
    labels = label_report(cfg, load_tokenizer(cfg.model.path, cfg.model.trust_remote_code), task.calibration)
    if cfg.generation.project or cfg.evaluation.project:
        labels.require_labels(cfg.task.domain)
    # the longest prompts with the tokens to generate fit the model (and a set max_model_len)
    context_length(cfg.model, cfg.generation, task.train_prompts, cfg.generation.max_new_tokens)
    context_length(cfg.model, cfg.generation, [it.prompt for items in task.eval_splits.values() for it in items],
                   cfg.evaluation.max_new_tokens)
    return cfg, task, labels


def base_model(cfg: SPDConfig) -> SPDConfig:
    """`cfg` with a GGUF `model.path` replaced by the model as a Hugging Face folder, which every
    stage and worker loads: converted once (`core.gguf.convert_gguf`, bf16 safetensors with the
    tokenizer, chat template and generation config) into
    `<run.output_dir>/models/<file name>-<key of its content>/`, and reused by every run of that
    output folder while its content check holds. Any other `model.path` is left as it is."""
    if not is_gguf(cfg.model.path):
        return cfg
    source = Path(cfg.model.path).expanduser().resolve()
    key = artifacts.file_key(source, str(GGUF_DTYPE))
    out = Path(cfg.run.output_dir).expanduser().resolve() / "models" / f"{source.stem}-{key}"
    with console.stage("model", f"{source.name} (GGUF) as a Hugging Face folder") as st:
        artifacts.made_once("model", out, lambda path: convert_gguf(source, path, GGUF_DTYPE))
        st.summary = str(out)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(out)))
