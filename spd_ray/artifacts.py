"""The run directory: resolved config, artifacts in open formats, and a manifest that lets a
rerun skip every stage whose artifact was already made from the same config.

    runs/<name>/config.yaml          resolved config
    runs/<name>/manifest.json        artifact -> fingerprint of the config sections it depends on
    runs/<name>/subspace/            safetensors bases + spectra, JSON metadata
    runs/<name>/generations/         parquet files: id, prompt, seed, completion
    runs/<name>/model/               the fine-tuned model (HF folder)
    runs/<name>/model.resume-<key>/  stage 3's Ray Train checkpoints, keyed like the model
    runs/<name>/corpus.json          quality of the raw generated corpus (diagnostic)
    runs/<name>/eval_*.json          JSON metrics; metrics.json and results.md sum up
    runs/<name>/round<k>/            the same artifacts for round k of iterated SPD
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spd_ray.config import SPDConfig, save_config, to_dict

# artifact -> the config sections whose values decide its content
DEPENDS_ON = {
    "subspace": ["model", "task", "calibration", "subspace"],
    "generations": ["model", "task", "calibration", "subspace", "generation"],
    "corpus.json": ["model", "task", "calibration", "subspace", "generation", "evaluation"],
    "model": ["model", "task", "calibration", "subspace", "generation", "finetune"],
    "eval_base.json": ["model", "task", "evaluation"],
    "eval_projected.json": ["model", "task", "calibration", "subspace", "evaluation"],
    "eval_spd.json": ["model", "task", "calibration", "subspace", "generation", "finetune", "evaluation"],
}
# fields that do not change an artifact although their section does: the base model's scores
# are shared by every method and ablation of an experiment
IGNORED = {"eval_base.json": {"task": {"calibration_loss", "n_calibration", "n_train_prompts"},
                              "evaluation": {"project"}},
           "corpus.json": {"evaluation": {"project"}},
           "eval_spd.json": {"evaluation": {"project"}}}


class RunDir:
    """Artifacts of one run. With `store` (a folder shared by the runs of an experiment), each
    artifact lives in `store/<key>/` and the run directory links to it, so runs whose configs
    agree on an artifact's sections compute it once."""

    def __init__(self, cfg: SPDConfig, store: Path | None = None):
        self.cfg = cfg
        self.path = cfg.run_dir.resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.store = None if store is None else Path(store).resolve()
        save_config(cfg, self.path / "config.yaml")
        self._manifest_path = self.path / "manifest.json"
        self.manifest = json.loads(self._manifest_path.read_text()) if self._manifest_path.exists() else {}

    def key(self, name: str, cfg: SPDConfig | None = None) -> str:
        """Fingerprint of what `name` depends on; `name` may sit under a round folder (round2/model)."""
        base = name.rsplit("/", 1)[-1]
        cfg = cfg or self.cfg
        ignored = IGNORED.get(base, {})
        sections = {s: {k: v for k, v in to_dict(getattr(cfg, s)).items() if k not in ignored.get(s, ())}
                    for s in DEPENDS_ON[base]}
        if "subspace" in sections and cfg.subspace.kind != "random":
            del sections["subspace"]["random_seed"]  # a gradient subspace is the same for every seed
        return hashlib.sha256(json.dumps([base, sections], sort_keys=True).encode()).hexdigest()[:16]

    def stage(self, name: str, produce: Callable[[Path], Any], cfg: SPDConfig | None = None) -> Path:
        """The artifact `name` (a file or folder), made from `cfg` (default: the run's): reused
        when it was already made from the same config, else produced afresh. It counts as done
        only after `produce` returns, so a crash leaves the stage to be redone, and nothing else."""
        key = self.key(name, cfg)
        if self.store is not None:
            return self._shared(name, key, produce)
        out = self.path / name
        entry = self.manifest.get(name)
        if entry and entry["key"] == key and out.exists():
            print(f"  {name}: reusing {out} (same config)", flush=True)
            return out
        if out.exists():
            if entry:  # made from another config: kept aside, not lost
                out.rename(out.with_name(f"{out.name}.{entry['key']}"))
            elif out.is_dir():
                shutil.rmtree(out)  # partial output of a crashed stage
            else:
                out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        produce(out)
        self._record(name, key)
        return out

    def resume_dir(self, name: str, cfg: SPDConfig | None = None) -> Path:
        """Where a long stage making `name` keeps the state it resumes from (Ray Train's
        checkpoints), keyed like the artifact: a rerun with a config that changes the artifact
        starts afresh instead of resuming, and finishing, someone else's run."""
        key = self.key(name, cfg)
        if self.store is None:
            return self.path / f"{name}.resume-{key}"
        return self.store / key / f"{name.rsplit('/', 1)[-1]}.resume-{key}"

    def _shared(self, name: str, key: str, produce: Callable[[Path], Any]) -> Path:
        out = self.store / key / name.rsplit("/", 1)[-1]
        if out.exists():
            print(f"  {name}: reusing {out} (same config)", flush=True)
        else:
            partial = out.with_name(out.name + ".partial")  # renamed only once complete
            if partial.is_dir():
                shutil.rmtree(partial)
            partial.unlink(missing_ok=True)
            partial.parent.mkdir(parents=True, exist_ok=True)
            produce(partial)
            partial.rename(out)
        link = self.path / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(out, target_is_directory=out.is_dir())
        self._record(name, key)
        return out

    def _record(self, name: str, key: str) -> None:
        self.manifest[name] = {"key": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._manifest_path.write_text(json.dumps(self.manifest, indent=1))


def comparison_table(metrics: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per evaluation metric, one column per model, plus the SPD - base delta."""
    models = list(metrics)
    keys = list(metrics[models[0]])
    lines = ["| metric | " + " | ".join(models) + " | delta |", "|---" * (len(models) + 2) + "|"]
    for k in keys:
        vals = [metrics[m].get(k) for m in models]
        delta = vals[-1] - vals[0]
        lines.append(f"| {k} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {delta:+.3f} |")
    return "\n".join(lines) + "\n"
