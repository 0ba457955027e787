"""Self-Policy Distillation on Ray.

Layers, each importing only those before it (tests/test_layers.py holds it):
- `spd_ray.config`: the typed settings, which import nothing of ours;
- `spd_ray.core`: the method in plain torch + transformers (no Ray): correctness spans, K/V
  gradients, the capability subspace, the projection, sampling, model loading, the fine-tuning
  recipe;
- `spd_ray.tasks`: the examples (`tasks.item`), their sources (testbed, hub) and scoring, with the
  code sandbox;
- `spd_ray.stages`: stages 1-3 and evaluation on Ray, each one driver of the same shape,
  `(ModelConfig, its config section, its inputs, out) -> a small result dataclass`;
- `spd_ray.pipeline`: the run in the paper's order (jobs/spd.py is its entry point).
Beside them: `console`, `data` and `stats` (which import nothing of ours), `artifacts`,
`checks`, `tracking`, `report`, `local_ray` (the job's Ray session); and `api`, SPD as functions for
a training stack of your own, exported here (`spd_ray.extract_subspace`, ...).
"""

import importlib
import os

# spd_ray.api is imported on first use (PEP 562): it imports torch, and a job imports spd_ray,
# then sets the offline defaults below, before transformers is first imported
_API = ("CapabilitySubspace", "extract_subspace", "fold", "projection_hooks")
__all__ = [*_API, "OFFLINE_DEFAULTS", "offline_by_default"]

# The embedded testbed never needs a network: the Hugging Face hub and datasets are offline
# unless the environment says otherwise (hub runs set both to 0). Both libraries read these once,
# when first imported, so a job sets them before that; the pipeline passes them on to Ray.
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def offline_by_default() -> None:
    """Set each of `OFFLINE_DEFAULTS` that the environment does not set already."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)


def __getattr__(name: str):
    """The API's names, from spd_ray.api on first use."""
    if name in _API:
        return getattr(importlib.import_module("spd_ray.api"), name)
    raise AttributeError(f"module 'spd_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    """This module's names, the API's among them (for tab completion)."""
    return sorted({*globals(), *_API})
