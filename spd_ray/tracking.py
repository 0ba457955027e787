"""Weights & Biases: one run per pipeline run, logged from the driver only.

Offline when no API key is present (`run.wandb.mode=auto`), a no-op when disabled. The run id
is kept in the run directory, so a resumed pipeline appends to the same W&B run.
"""

from __future__ import annotations

import os
import shlex
import uuid
from pathlib import Path

from spd_ray.config import SPDConfig, to_dict
from spd_ray.core.subspace import cumulative_energy


class Tracker:
    def __init__(self, cfg: SPDConfig, run_dir: Path):
        self.run, self.run_id = None, None
        w = cfg.run.wandb
        if not w.enabled or w.mode == "disabled":
            return
        import wandb

        mode = w.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.run_id = run_id
        self.run = wandb.init(project=w.project, group=w.group or cfg.run.name, name=cfg.run.name,
                              id=run_id, resume="allow", mode=mode, dir=str(run_dir),
                              config=to_dict(cfg))

    def where(self) -> str | None:
        """Where the W&B run is: its page, or (offline) the command that uploads it."""
        if self.run is None:
            return None
        return f"offline: `wandb sync {shlex.quote(str(self.run.sync_dir))}` uploads it" if self.run.offline else self.run.url

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def table(self, key: str, rows: list[dict]) -> None:
        if self.run is not None and rows:
            import wandb

            columns = list(rows[0])
            self.run.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})

    def images(self, paths: dict[str, Path]) -> None:
        if self.run is not None and paths:
            import wandb

            self.run.log({key: wandb.Image(str(path)) for key, path in paths.items()})

    def spectra(self, subspace) -> None:
        """Cumulative energy of the gradient spectrum per layer and K/V, with its rank, as a plot."""
        if self.run is None:
            return
        import wandb

        keys = sorted(subspace.singular_values)
        curves = [cumulative_energy(subspace.singular_values[key].double() ** 2).tolist() for key in keys]
        names = [f"layer{layer}.{kind}" for layer, kind in keys]
        self.run.log({
            "stage1/spectra": wandb.plot.line_series(
                xs=list(range(1, len(curves[0]) + 1)), ys=curves, keys=names,
                title="capability subspace: cumulative energy by rank", xname="rank"),
            **{f"stage1/{n}/energy_captured": subspace.energy[k] for n, k in zip(names, keys)},
            **{f"stage1/{n}/rank": subspace.bases[k].shape[1] for n, k in zip(names, keys)},
        })

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
