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
    runs/<name>/logs/driver.log      everything the driver printed beyond the console (spd_ray.console)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spd_ray import console
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
# artifact -> the parts of the task's data (their content hashes, Task.fingerprints) it is made from
DATA_DEPENDS_ON = {
    "subspace": ["calibration"],
    "generations": ["calibration", "train"],
    "corpus.json": ["calibration", "train"],
    "model": ["calibration", "train"],
    "eval_base.json": ["eval"],
    "eval_projected.json": ["calibration", "eval"],
    "eval_spd.json": ["calibration", "train", "eval"],
}
# fields that do not change an artifact although their section does: the base model's scores
# are shared by every method and ablation of an experiment
IGNORED = {"eval_base.json": {"task": {"calibration_loss", "n_calibration", "n_train_prompts"},
                              "evaluation": {"project"}},
           "corpus.json": {"evaluation": {"project"}},
           "eval_spd.json": {"evaluation": {"project"}}}
# how often to retry and to checkpoint: never what an artifact holds
RECOVERY = {"calibration": {"max_failures"},
            "finetune": {"max_failures", "checkpoint_every_steps", "checkpoint_every_s"}}


class RunDir:
    """Artifacts of one run. With `store` (a folder shared by the runs of an experiment), each
    artifact lives in `store/<key>/` and the run directory links to it, so runs whose configs
    agree on an artifact's sections compute it once. `data`: the content hashes of the task's
    parts (`Task.fingerprints()`), part of every key, so edited data files are never reused."""

    def __init__(self, cfg: SPDConfig, store: Path | None = None, data: dict[str, str] | None = None):
        self.cfg = cfg
        self.data = data or {}
        self.path = cfg.run_dir.resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.store = None if store is None else Path(store).resolve()
        save_config(cfg, self.path / "config.yaml")
        self._manifest_path = self.path / "manifest.json"
        self.manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        if not self._manifest_path.exists():
            return {}
        try:
            return json.loads(self._manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:  # written atomically: not by us
            aside = _set_aside(self._manifest_path, "damaged")
            console.warn(f"{self._manifest_path} is damaged ({err}); moved to {aside.name}: "
                         "no artifact can be checked against it, so each is made again")
            return {}

    def key(self, name: str, cfg: SPDConfig | None = None) -> str:
        """Fingerprint of what `name` depends on; `name` may sit under a round folder (round2/model)."""
        base = name.rsplit("/", 1)[-1]
        cfg = cfg or self.cfg
        ignored = IGNORED.get(base, {})
        sections = {s: {k: v for k, v in to_dict(getattr(cfg, s)).items()
                        if k not in ignored.get(s, ()) and k not in RECOVERY.get(s, ())}
                    for s in DEPENDS_ON[base]}
        if "subspace" in sections and cfg.subspace.kind != "random":
            del sections["subspace"]["random_seed"]  # a gradient subspace is the same for every seed
        data = {part: self.data[part] for part in DATA_DEPENDS_ON[base] if part in self.data}
        return hashlib.sha256(json.dumps([base, sections, data], sort_keys=True).encode()).hexdigest()[:16]

    def stage(self, name: str, produce: Callable[[Path], Any], cfg: SPDConfig | None = None,
              resumable: bool = False) -> Path:
        """The artifact `name` (a file or folder), made from `cfg` (default: the run's): reused
        when it was made from the same config and its content still matches what was recorded,
        else produced afresh. `produce` writes a `.partial-<key>` path that is renamed only once
        the manifest holds its content check, so a kill at any moment leaves the old state or the
        new. `resumable`: a partial left by a killed run of the same config is handed to
        `produce` again, to go on from (stage 2 writes its rows as it goes)."""
        key = self.key(name, cfg)
        if self.store is not None:
            return self._shared(name, key, produce, resumable)
        out = self.path / name
        entry = self.manifest.get(name)
        if entry and entry["key"] == key and out.exists():
            damage = _damage(out, entry.get("content"))
            if not damage:
                console.echo(f"  {name}: reusing {out} (same config, content checked)")
                return out
            console.warn(f"{name}: {damage}; making it again")
            _set_aside(out, "damaged")
        elif out.exists():
            if entry:  # made from another config: kept aside, not lost
                out.rename(out.with_name(f"{out.name}.{entry['key']}"))
            else:  # no record of it: not ours to trust
                _remove(out)
        partial = _partial(out, key, resumable)
        produce(partial)
        self.manifest[name] = {"key": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                               "content": content_check(partial)}
        self._write_manifest()
        partial.rename(out)
        return out

    def resume_dir(self, name: str, cfg: SPDConfig | None = None) -> Path:
        """Where a long stage making `name` keeps the state it resumes from (Ray Train's
        checkpoints), keyed like the artifact: a rerun with a config that changes the artifact
        starts afresh instead of resuming, and finishing, someone else's run."""
        key = self.key(name, cfg)
        if self.store is None:
            return self.path / f"{name}.resume-{key}"
        return self.store / key / f"{name.rsplit('/', 1)[-1]}.resume-{key}"

    def _shared(self, name: str, key: str, produce: Callable[[Path], Any], resumable: bool) -> Path:
        out = self.store / key / name.rsplit("/", 1)[-1]
        check = out.with_name(out.name + ".content.json")  # beside it, for every run that links it
        damage = "missing" if not out.exists() else _damage(out, _read_json(check))
        if not damage:
            console.echo(f"  {name}: reusing {out} (same config, content checked)")
        else:
            if out.exists():
                console.warn(f"{name}: {damage}; making it again")
                _set_aside(out, "damaged")
            partial = _partial(out, key, resumable)
            produce(partial)
            _write_atomically(check, json.dumps(content_check(partial)))
            partial.rename(out)
        link = self.path / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(out, target_is_directory=out.is_dir())
        self.manifest[name] = {"key": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._write_manifest()
        return out

    def _write_manifest(self) -> None:
        _write_atomically(self._manifest_path, json.dumps(self.manifest, indent=1))


# Content checks: size and SHA-256 of every file of an artifact. Files over this size are hashed
# in 16 slices of 1 MiB spread over the file (with the size, that finds truncation and most
# damage, without reading a 15 GB model on every reuse).
_FULL_HASH_BYTES = 64 << 20


def _file_check(path: Path) -> dict:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as f:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            for i in range(16):
                f.seek((size - (1 << 20)) * i // 15)
                digest.update(f.read(1 << 20))
    return {"size": size, "sha256": digest.hexdigest()}


def content_check(path: Path) -> dict:
    """{relative file path: {size, sha256}} of a file or of every file under a folder."""
    if path.is_file():
        return {"": _file_check(path)}
    return {p.relative_to(path).as_posix(): _file_check(p) for p in sorted(path.rglob("*")) if p.is_file()}


def _damage(path: Path, recorded: dict | None) -> str | None:
    """None if `path` matches its recorded content check, else which file is damaged and how."""
    if recorded is None:
        return f"{path} has no content check recorded"
    found = content_check(path)
    for rel, want in recorded.items():
        where = path / rel if rel else path
        got = found.get(rel)
        if got is None:
            return f"{where} is missing"
        if got["size"] != want["size"]:
            return f"{where} is damaged ({got['size']} bytes, {want['size']} recorded)"
        if got["sha256"] != want["sha256"]:
            return f"{where} is damaged (its checksum differs from the recorded one)"
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def _set_aside(path: Path, why: str) -> Path:
    """Rename `path` to a free `<name>.<why>-<time>[-n]` beside it, kept for a look."""
    stem = f"{path.name}.{why}-{time.strftime('%Y%m%d%H%M%S')}"
    aside, n = path.with_name(stem), 1
    while aside.exists() or aside.is_symlink():
        aside, n = path.with_name(f"{stem}-{n}"), n + 1
    path.rename(aside)
    return aside


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _partial(out: Path, key: str, keep: bool) -> Path:
    """Where `out` is made; what a killed stage left there is redone, or kept if `keep`. Partials
    of other configs are removed: none of their content belongs to this one."""
    partial = out.with_name(f"{out.name}.partial-{key}")
    for old in out.parent.glob(f"{out.name}.partial*"):
        if old != partial or not keep:
            _remove(old)
    partial.parent.mkdir(parents=True, exist_ok=True)
    return partial

