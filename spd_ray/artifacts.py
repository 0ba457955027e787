"""The run directory: resolved config, artifacts in open formats, and a manifest that lets a
rerun skip every stage whose artifact was already made from the same config.

    runs/<name>/config.yaml          resolved config
    runs/<name>/manifest.json        artifact -> fingerprint of the config sections it depends on
    runs/<name>/subspace/            safetensors bases + spectra, JSON metadata
    runs/<name>/generations/         parquet files: id, prompt, seed, completion
    runs/<name>/model/               the fine-tuned model (HF folder)
    runs/<name>/eval_base, eval_spd  JSON metrics; metrics.json and results.md sum up
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
    "model": ["model", "task", "calibration", "subspace", "generation", "finetune"],
    "eval_base": ["model", "task", "evaluation"],
    "eval_spd": ["model", "task", "calibration", "subspace", "generation", "finetune", "evaluation"],
}


class RunDir:
    def __init__(self, cfg: SPDConfig):
        self.cfg = cfg
        self.path = cfg.run_dir.resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / "config.yaml")
        self._manifest_path = self.path / "manifest.json"
        self.manifest = json.loads(self._manifest_path.read_text()) if self._manifest_path.exists() else {}

    def key(self, name: str) -> str:
        sections = {s: to_dict(getattr(self.cfg, s)) for s in DEPENDS_ON[name.split(".")[0]]}
        return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:16]

    def stage(self, name: str, produce: Callable[[Path], Any]) -> Path:
        """The artifact `name` (a file or folder in the run directory): reused when the manifest
        says it was made from the same config, else produced afresh. The manifest is written
        only after `produce` returns, so a crash leaves the stage to be redone, and nothing else."""
        out = self.path / name
        entry = self.manifest.get(name)
        if entry and entry["key"] == self.key(name) and out.exists():
            print(f"  {name}: reusing {out} (same config)", flush=True)
            return out
        if out.exists():
            if entry:  # made from another config: kept aside, not lost
                out.rename(out.with_name(f"{name}.{entry['key']}"))
            elif out.is_dir():
                shutil.rmtree(out)  # partial output of a crashed stage
            else:
                out.unlink()
        produce(out)
        self.manifest[name] = {"key": self.key(name), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._manifest_path.write_text(json.dumps(self.manifest, indent=1))
        return out


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
