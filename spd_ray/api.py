"""SPD as plain functions, for a training stack of your own (TRL, OpenRLHF, ...).

Extract the capability subspace of a model from labeled calibration texts, then sample under the
projection (`projection_hooks`) or from a copy with the projection folded into its weights
(`fold`), and save / load the subspace (`CapabilitySubspace.save` / `.load`). Every function runs
the same core (`spd_ray.core`) as the pipeline's stage 1 and 2, on one process and the model's
device; the defaults are the paper's, from `spd_ray.config` (`CalibrationConfig`,
`SubspaceConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from spd_ray import data
from spd_ray.config import CalibrationConfig, SubspaceConfig
from spd_ray.core.gradients import accumulate_kv_gradient_stats
from spd_ray.core.modeling import resolve_layers
from spd_ray.core.projection import fold_projection, projection_hooks
from spd_ray.core.spans import SPAN_RULES, calibration_batches, correctness_spans
from spd_ray.core.subspace import CapabilitySubspace, build_subspace

if TYPE_CHECKING:  # type names only: importing this module must not import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["CapabilitySubspace", "extract_subspace", "fold", "projection_hooks"]

Span = tuple[int, int]


def _text_spans(texts: Sequence[str], spans: Sequence[Sequence[Span]] | None,
                rule: str | Sequence[str] | None) -> list[Sequence[Span]]:
    """Each text's correctness spans: the ones given, or those of its rule."""
    if (spans is None) == (rule is None):
        raise ValueError(
            f"extract_subspace: pass either spans= (per text a list of (start, end) character "
            f"spans) or rule= (one of {list(SPAN_RULES)}, or a list with one per text), "
            f"not {'both' if spans is not None else 'neither'}")
    rules = None if rule is None else [rule] * len(texts) if isinstance(rule, str) else rule
    for name, given in (("spans", spans), ("rule", rules)):
        if given is not None and len(given) != len(texts):
            raise ValueError(f"extract_subspace: {name} has {len(given)} entries for {len(texts)} "
                             "texts; give one per text, in the order of texts")
    if spans is not None:
        return list(spans)
    return [correctness_spans(text, r) for text, r in zip(texts, rules, strict=True)]


def extract_subspace(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    spans: Sequence[Sequence[Span]] | None = None,
    rule: str | Sequence[str] | None = None,
    layers: list[int] | None = CalibrationConfig.layers,
    rank_mode: str = SubspaceConfig.rank_mode,
    rank: int | None = SubspaceConfig.rank,
    energy: float = SubspaceConfig.energy,
    center: bool = SubspaceConfig.center,
    batch_size: int = CalibrationConfig.batch_size,
    max_length: int = CalibrationConfig.max_length,
) -> CapabilitySubspace:
    """The capability subspace of `model` from labeled calibration `texts` (prompt + answer).

    Which tokens the correctness loss reads (paper Eq. 6), exactly one of:
    - `spans`: per text, a list of (start, end) character spans of that text;
    - `rule`: a span rule of `spd_ray.core.spans` ("final_number": after GSM8K's `#### `,
      "answer_letter": after `Answer:`, "asserts": each `assert ...` line; "full": the whole
      text, the paper's Table 5 ablation), one for every text or a list with one per text.
    A text with no labeled token (within `max_length` tokens) is skipped and counted in
    `meta["skipped"]`; if all are, it is an error.

    `layers` (None: the last and the middle one; negative indices count from the end),
    `batch_size` and `max_length` default to `CalibrationConfig`'s; `rank_mode` ("half",
    "fixed" with `rank`, or "energy" with `energy`), and `center` to `SubspaceConfig`'s.
    The model's parameters and train/eval mode are restored afterwards.

    Returns one orthonormal basis per (layer, "k" | "v") of the k_proj / v_proj outputs, with
    its singular values and captured energy; `meta` records the model, layers, examples used,
    skipped, the texts' hash, the mean calibration loss, and the ranks.
    """
    if isinstance(texts, str):
        raise TypeError("extract_subspace: texts is one string; pass a list of calibration texts")
    batches, skipped = calibration_batches(tokenizer, texts, _text_spans(texts, spans, rule),
                                           batch_size=batch_size, max_length=max_length)
    layers = resolve_layers(model, layers)
    stats, loss = accumulate_kv_gradient_stats(model, batches, layers, batch_size=batch_size)
    labeled_by = "explicit" if spans is not None else rule if isinstance(rule, str) else \
        sorted(set(rule))
    meta = {"model": getattr(model, "name_or_path", type(model).__name__), "layers": layers,
            "spans": labeled_by, "n_calibration": len(texts) - skipped, "skipped": skipped,
            "calibration_hash": data.fingerprint(texts), "mean_calibration_loss": loss}
    return build_subspace(stats, rank_mode=rank_mode, rank=rank, energy=energy, center=center,
                          meta=meta)


def fold(model: PreTrainedModel, subspace: CapabilitySubspace,
         mode: str = SubspaceConfig.mode) -> PreTrainedModel:
    """A copy of `model` with the projection folded into its k_proj / v_proj weights and biases
    (W <- P W, b <- P b): the same outputs as `projection_hooks`, with no per-token cost, so it
    can be saved and served by any engine. `model` itself is left unchanged.

    `mode` ("both", "k_only" or "v_only") defaults to `SubspaceConfig.mode`.
    """
    return fold_projection(model, subspace, mode)
