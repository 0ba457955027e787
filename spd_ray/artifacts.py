"""The run directory: resolved config, artifacts in open formats, and a manifest that lets a
rerun skip every stage whose artifact was already made from the same config.

    runs/<name>/config.yaml          resolved config
    runs/<name>/manifest.json        artifact -> fingerprint of the config sections it depends on
    runs/<name>/subspace/            safetensors bases + spectra, JSON metadata
    runs/<name>/generations.parquet  prompt, completion, id, seed
    runs/<name>/model/               the fine-tuned model (HF folder)
    runs/<name>/eval_*.json, metrics.json, results.md
"""

from __future__ import annotations

import hashlib
import json
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
        self.path = cfg.run_dir
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / "config.yaml")
        self._manifest_path = self.path / "manifest.json"
        self.manifest = json.loads(self._manifest_path.read_text()) if self._manifest_path.exists() else {}

    def key(self, name: str) -> str:
        sections = {s: to_dict(getattr(self.cfg, s)) for s in DEPENDS_ON[name]}
        return hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:16]

    def cached(self, name: str, compute: Callable[[], Any]) -> Any:
        """Load artifact `name` if it was made from the same config, else compute and save it."""
        entry = self.manifest.get(name)
        if entry and entry["key"] == self.key(name) and (self.path / entry["file"]).exists():
            print(f"  {name}: reusing {self.path / entry['file']} (same config)", flush=True)
            return _LOADERS[name](self.path / entry["file"], self.cfg)
        value = compute()
        file = _SAVERS[name](value, self.path, name, self.cfg)
        self.manifest[name] = {"key": self.key(name), "file": file, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._manifest_path.write_text(json.dumps(self.manifest, indent=1))
        return value

    def write_text(self, name: str, text: str) -> None:
        (self.path / name).write_text(text)


def _save_subspace(subspace, root: Path, name: str, cfg: SPDConfig) -> str:
    subspace.save(root / name)
    return name


def _load_subspace(path: Path, cfg: SPDConfig):
    from spd_ray.subspace import CapabilitySubspace

    return CapabilitySubspace.load(path)


def _save_rows(rows: list[dict], root: Path, name: str, cfg: SPDConfig) -> str:
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(root / f"{name}.parquet"))
    return f"{name}.parquet"


def _load_rows(path: Path, cfg: SPDConfig) -> list[dict]:
    from datasets import Dataset

    return Dataset.from_parquet(str(path)).to_list()


def _save_model(model, root: Path, name: str, cfg: SPDConfig) -> str:
    from spd_ray.modeling import load_tokenizer

    model.save_pretrained(root / name)  # a plain HF folder: reloads with from_pretrained
    load_tokenizer(cfg.model.path, cfg.model.trust_remote_code).save_pretrained(root / name)
    return name


def _load_model(path: Path, cfg: SPDConfig):
    from spd_ray.modeling import load_model

    return load_model(str(path), cfg.model.dtype, cfg.model.device, cfg.model.trust_remote_code)


def _save_json(value: dict, root: Path, name: str, cfg: SPDConfig) -> str:
    (root / f"{name}.json").write_text(json.dumps(value, indent=1))
    return f"{name}.json"


def _load_json(path: Path, cfg: SPDConfig) -> dict:
    return json.loads(path.read_text())


_SAVERS = {"subspace": _save_subspace, "generations": _save_rows, "model": _save_model,
           "eval_base": _save_json, "eval_spd": _save_json}
_LOADERS = {"subspace": _load_subspace, "generations": _load_rows, "model": _load_model,
            "eval_base": _load_json, "eval_spd": _load_json}


class Progress:
    """Progress lines for long steps, about every 10% (or every 20 steps when the total is unknown)."""

    def __init__(self, what: str, total: int | None, log: Callable[[str], None]):
        self.what, self.total, self.log = what, total, log
        self.done, self.start, self.next_report = 0, time.time(), 0.1

    def advance(self, n: int) -> None:
        self.done += n
        if self.total and self.done / self.total >= self.next_report:
            rate = self.done / max(1e-9, time.time() - self.start)
            self.log(f"  {self.what}: {self.done}/{self.total} ({rate:.1f}/s)")
            self.next_report += 0.1

    def step(self, info: dict) -> None:
        self.total = info["total_steps"]
        if info["step"] % max(1, self.total // 10) == 0 or info["step"] == self.total:
            self.log(f"  {self.what}: step {info['step']}/{self.total} loss {info['loss']:.3f} "
                     f"lr {info['lr']:.2e}")


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
