"""The layers: spd_ray.core runs without Ray or DeepSpeed (every DeepSpeed call is in
spd_ray.stages.deepspeed), and the pipeline sets the offline defaults before anything reads them."""

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import spd_ray.core

ROOT = Path(__file__).resolve().parents[1]
CORE = sorted(f"spd_ray.core.{m.name}" for m in pkgutil.iter_modules(spd_ray.core.__path__))
HUB_LIBRARIES = ("huggingface_hub", "transformers", "datasets")


def _fresh(code: str, env: dict | None = None):
    """What `code` prints (JSON) in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_runs_without_importing_ray_or_deepspeed(testbed_model_path):
    assert {"spd_ray.core.recipe", "spd_ray.core.subspace", "spd_ray.core.modeling"} <= set(CORE)
    # every core module, and the lazy imports of its loaders (transformers, peft) too
    code = f"""
import importlib, json, sys
for name in {CORE!r}:
    importlib.import_module(name)
from spd_ray.config import FinetuneConfig
from spd_ray.core.generation import generate
from spd_ray.core.modeling import load_model, load_tokenizer
from spd_ray.core.recipe import prepare_model
model, tok = load_model({testbed_model_path!r}, device="cpu"), load_tokenizer({testbed_model_path!r})
generate(model, tok, ["Question: 1 + 1?\\nAnswer:"], max_new_tokens=2)
prepare_model(model, FinetuneConfig())
print(json.dumps(sorted(n for n in sys.modules if n.split(".")[0] in ("ray", "deepspeed"))))
"""
    assert _fresh(code) == []


def test_the_pipeline_sets_the_offline_defaults_before_the_hub_libraries_read_them():
    code = f"""
import json, os, sys
import spd_ray.pipeline
print(json.dumps([os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"),
                  [m for m in {HUB_LIBRARIES!r} if m in sys.modules]]))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    assert _fresh(code, env) == ["1", "1", []]
    assert _fresh(code, {**env, "HF_HUB_OFFLINE": "0"}) == ["0", "1", []]  # the caller's value stays


def test_import_spd_ray_imports_neither_torch_nor_the_hub_libraries():
    # the API's names load on first use, so a job may import spd_ray, then set the offline
    # defaults, before transformers reads them
    code = f"""
import json, sys
import spd_ray
before = [m for m in ("torch", *{HUB_LIBRARIES!r}) if m in sys.modules]
print(json.dumps([before, callable(spd_ray.extract_subspace), "extract_subspace" in dir(spd_ray)]))
"""
    assert _fresh(code) == [[], True, True]


# what each layer of spd_ray may import of spd_ray (its own modules aside); the modules beside
# the layers: console, data and stats import nothing of ours
LAYERS = {"config": set(), "console": set(), "data": set(), "stats": set(),
          "core": {"config"},
          "tasks": {"config", "core", "console"},
          "stages": {"config", "core", "tasks", "console", "data"}}


def _imports(path: Path) -> set[str]:
    """The spd_ray modules a file imports, at the top or inside a function, as package parts
    (`spd_ray.core.spans` -> `core`)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found |= {n.split(".")[1] for n in names if n.startswith("spd_ray.")}
    return found


def test_imports_point_down_the_layers():
    """config <- core <- tasks <- stages <- pipeline: no layer imports one above it, so none
    needs a local import to break a cycle."""
    wrong = {}
    for path in sorted((ROOT / "spd_ray").rglob("*.py")):
        parts = path.relative_to(ROOT / "spd_ray").with_suffix("").parts
        layer = parts[0]
        if layer not in LAYERS:
            continue
        bad = _imports(path) - LAYERS[layer] - {layer}
        if bad:
            wrong[str(path.relative_to(ROOT))] = sorted(bad)
    assert wrong == {}
