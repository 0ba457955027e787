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

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from spd_ray import console
from spd_ray.config import SPDConfig, save_config, to_dict

# artifact -> the config sections whose values decide its content
DEPENDS_ON = {
    "subspace": ["model", "task", "calibration", "subspace"],
    "generations": ["model", "task", "calibration", "subspace", "generation"],
    "corpus.json": ["model", "task", "calibration", "subspace", "generation", "evaluation"],
    "model": ["model", "task", "calibration", "subspace", "generation", "finetune"],
    "eval_base.json": ["model", "task", "evaluation"],
    "eval_base_float32.json": ["model", "task", "evaluation"],  # where the trained model is evaluated in float32
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
    "eval_base_float32.json": ["eval"],
    "eval_projected.json": ["calibration", "eval"],
    "eval_spd.json": ["calibration", "train", "eval"],
}
# fields that do not change an artifact although their section does: the base model's scores
# are shared by every method and ablation of an experiment, a subspace by every way to apply it
IGNORED = {"subspace": {"subspace": {"mode", "apply", "beta"}},  # how it is applied, not what it is
           "eval_base.json": {"task": {"calibration_loss", "n_calibration", "n_train_prompts"},
                              "evaluation": {"project"}},
           "eval_base_float32.json": {"task": {"calibration_loss", "n_calibration", "n_train_prompts"},
                                      "evaluation": {"project"}},
           "corpus.json": {"evaluation": {"project"}},
           "eval_spd.json": {"evaluation": {"project"}}}
# how often to retry and to checkpoint: never what an artifact holds
RECOVERY = {"calibration": {"max_failures"},
            "finetune": {"max_failures", "checkpoint_every_steps", "checkpoint_every_s"}}


@dataclass
class Artifact:
    """One artifact of a run as `RunDir.stage` hands it out: to make (`todo`: write `path`) or
    made (`path` is the artifact); `digest` is what its dependents record of it."""
    path: Path
    todo: bool
    digest: str | None = None
    previous: str | None = None  # the digest recorded before it was found damaged


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

    @contextlib.contextmanager
    def stage(self, name: str, cfg: SPDConfig | None = None, *, inputs: Sequence[str] = (),
              resumable: bool = False, digest: Callable[[Path], str] | None = None
              ) -> Iterator[Artifact]:
        """The artifact `name` (a file or folder), made from `cfg` (default: the run's) and the
        artifacts `inputs` (names of this run's artifacts made before it):

            with run.stage("subspace", cfg) as art:
                if art.todo:
                    make_it(art.path)
            use(art.path)

        Reused when it was made from the same config and the same inputs and its content still
        matches what was recorded; else `todo`, and the body writes `path` (a `.partial-<key>`
        path, renamed once the manifest holds its content check when the block ends without an
        error, so a kill at any moment leaves the old state or the new). `resumable`: a partial
        left by a killed run of the same config is handed to the body again, to go on from
        (stage 2 writes its rows as it goes). `digest`: what a dependent compares to tell
        whether the artifact changed (default: its files' checksums)."""
        key = self.key(name, cfg)
        made_from = {i: self.manifest.get(i, {}).get("digest") for i in inputs}
        art = self._shared(name, key, made_from) if self.store is not None else \
            self._local(name, key, made_from)
        out = art.path
        if art.todo:
            art.path = _partial(out, key, resumable)
        yield art
        if art.todo:
            self._commit(name, key, art, out, made_from, digest or _content_digest)
        if self.store is not None:
            _link(self.path / name, out)
            self.manifest[name] = _entry(key, art.digest)
            self._write_manifest()

    def _commit(self, name: str, key: str, art: Artifact, out: Path, made_from: dict,
                digest: Callable[[Path], str]) -> None:
        """The finished partial becomes the artifact: its content check and the digests of its
        inputs recorded (in the store: in a file beside it, for every run that links it), then
        renamed into place."""
        content, art.digest = content_check(art.path), digest(art.path)
        record = {"content": content, "digest": art.digest, "inputs": made_from}
        if self.store is not None:
            _write_atomically(_check_file(out), json.dumps(record))
        else:
            self.manifest[name] = {**_entry(key, art.digest), **record}
            self._write_manifest()
        art.path.rename(out)
        art.path, art.todo = out, False
        if art.previous is not None:  # remade after damage: is what was made from it stale?
            console.echo(f"  {name}: made again, " + (
                "with the content recorded before: what was made from it is kept"
                if art.previous == art.digest else "with other content than recorded before: "
                "what was made from it is made again"))

    def _local(self, name: str, key: str, made_from: dict) -> Artifact:
        """Where `name` stands in the run directory: reusable, or to make (the old one set aside
        or removed)."""
        out = self.path / name
        entry = self.manifest.get(name)
        if entry and entry["key"] == key and out.exists():
            damage = _damage(out, entry, made_from)
            if not damage:
                console.echo(f"  {name}: reusing {out} (same config, content checked)")
                return Artifact(out, False, digest=entry.get("digest"))
            console.warn(f"{name}: {damage}; making it again")
            _set_aside(out, "damaged")
            return Artifact(out, True, previous=entry.get("digest"))
        if out.exists():
            if entry:  # made from another config: kept aside, not lost
                out.rename(out.with_name(f"{out.name}.{entry['key']}"))
            else:  # no record of it: not ours to trust
                _remove(out)
        return Artifact(out, True)

    def _shared(self, name: str, key: str, made_from: dict) -> Artifact:
        """Where `name` stands in the store: reusable, or to make (the old one set aside)."""
        return _stored(name, self.store / key / name.rsplit("/", 1)[-1], made_from)

    def resume_dir(self, name: str, cfg: SPDConfig | None = None, inputs: Sequence[str] = ()) -> Path:
        """Where a long stage making `name` keeps the state it resumes from (Ray Train's
        checkpoints), keyed like the artifact and by its inputs' digests: a rerun with a config
        or inputs that change the artifact starts afresh instead of resuming, and finishing,
        someone else's run."""
        key = self.key(name, cfg)
        digests = [self.manifest.get(i, {}).get("digest") for i in inputs]
        if any(digests):
            key = hashlib.sha256(json.dumps([key, digests]).encode()).hexdigest()[:16]
        if self.store is None:
            return self.path / f"{name}.resume-{key}"
        return self.store / key / f"{name.rsplit('/', 1)[-1]}.resume-{key}"

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


def _damage(path: Path, record: dict | None, made_from: dict) -> str | None:
    """None if `path` was made from the inputs `made_from` and matches its recorded content
    check, else what is wrong."""
    if record is None or "content" not in record:
        return f"{path} has no content check recorded"
    for name, digest in made_from.items():
        if record.get("inputs", {}).get(name, digest) != digest:
            return f"{path} was made from another {name} than this run's"
    found = content_check(path)
    for rel, want in record["content"].items():
        where = path / rel if rel else path
        got = found.get(rel)
        if got is None:
            return f"{where} is missing"
        if got["size"] != want["size"]:
            return f"{where} is damaged ({got['size']} bytes, {want['size']} recorded)"
        if got["sha256"] != want["sha256"]:
            return f"{where} is damaged (its checksum differs from the recorded one)"
    return None


def _stored(name: str, out: Path, made_from: dict) -> Artifact:
    """Where the artifact `name` stands at `out`, a path that holds its key (a store's
    `<key>/<name>`), with its content check in a file beside it: reusable, or to make (a damaged
    one set aside)."""
    record = _read_json(_check_file(out))
    damage = "missing" if not out.exists() else _damage(out, record, made_from)
    if not damage:
        console.echo(f"  {name}: reusing {out} (same config, content checked)")
        return Artifact(out, False, digest=record.get("digest"))
    if out.exists():
        console.warn(f"{name}: {damage}; making it again")
        _set_aside(out, "damaged")
    return Artifact(out, True, previous=(record or {}).get("digest"))


def made_once(name: str, out: Path, make: Callable[[Path], object]) -> Path:
    """`out`, a file or folder whose path holds the key of what it is made from (so nothing
    else is ever there), as `make(path)` writes it: made once, aside and renamed into place
    with its content check beside it, then reused wherever that check still holds (the converted
    model of a GGUF file, shared by every run of an output folder)."""
    art = _stored(name, out, {})
    if art.todo:
        partial = _partial(out, name, keep=False)
        make(partial)
        _write_atomically(_check_file(out), json.dumps({"content": content_check(partial),
                                                        "digest": _content_digest(partial)}))
        partial.rename(out)
    return out


def file_key(path: Path, *extra: str) -> str:
    """A key of a file's content (its size and SHA-256, sliced above 64 MiB as content checks
    are) and of `extra` strings (how it is used)."""
    return hashlib.sha256(json.dumps([_file_check(path), *extra]).encode()).hexdigest()[:16]


def _content_digest(path: Path) -> str:
    """The default digest of an artifact: of its files' checksums."""
    return hashlib.sha256(json.dumps(content_check(path), sort_keys=True).encode()).hexdigest()[:16]


def _entry(key: str, digest: str | None) -> dict:
    return {"key": key, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "digest": digest}


def _check_file(out: Path) -> Path:
    return out.with_name(out.name + ".content.json")  # beside the artifact in the store


def _link(link: Path, target: Path) -> None:
    """`link` (in the run directory) pointing at `target` (in the store)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target, target_is_directory=target.is_dir())


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

