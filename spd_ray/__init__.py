"""Self-Policy Distillation on Ray.

Layers, each importing only those before it:
- `spd_ray.core`: the method in plain torch + transformers (no Ray): correctness spans, K/V
  gradients, the capability subspace, the projection, sampling, model loading, the fine-tuning
  recipe;
- `spd_ray.tasks`: the examples (`tasks.item`), their sources (testbed, hub) and scoring, with the
  code sandbox;
- `spd_ray.stages`: stages 1-3 and evaluation on Ray;
- `spd_ray.pipeline`: the run in the paper's order (jobs/spd.py is its entry point).
Beside them: `config`, `artifacts`, `data`, `tracking`, `report`.
"""

import os

# The embedded testbed never needs a network: the Hugging Face hub and datasets are offline
# unless the environment says otherwise (hub runs set both to 0). Both libraries read these once,
# when first imported, so a job sets them before that; the pipeline passes them on to Ray.
OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def offline_by_default() -> None:
    """Set each of `OFFLINE_DEFAULTS` that the environment does not set already."""
    for name, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(name, value)
