"""N:M semi-structured sparsity along the input dimension of every block Linear (the ``sparsify`` stage).

Every Linear inside the blocks keeps at most N non-zeros in every group of M consecutive input
weights of each output row (the pattern and its checker: :mod:`mimc.models.nm_pattern`). Masks are
baked into the dense weights as zeros and ``EncoderConfig.nm_pattern`` is set, so the manifest
tells a TensorRT build to enable sparse weights.

Methods (``NMSparsityConfig.method``): ``magnitude``, ``wanda`` and ``sparsegpt`` are one-shot
(:mod:`mimc.compression.nm_oneshot`); ``learned`` is MaskLLM (:mod:`mimc.compression.nm_learned`).
The stage calls :func:`~mimc.models.nm_pattern.check_nm` after writing masks; export calls it
before writing a graph.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from mimc.compression.calib_stats import calibration_pixels
from mimc.compression.nm_learned import NMLearnedConfig, learn_nm_masks
from mimc.compression.nm_oneshot import one_shot_sparsify
from mimc.compression.registry import StageConfig, clone_encoder, register
from mimc.data import deterministic_inputs
from mimc.errors import ConfigError
from mimc.models.nm_pattern import check_nm, parse_pattern, validate_pattern
from mimc.train.config import TrainRun
from mimc.options import option
from mimc.compression.rsq import DEFAULT_R_MIN, WEIGHTINGS

METHODS = ("magnitude", "wanda", "sparsegpt", "learned")


# The stage ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NMSparsityConfig(StageConfig):
    """N:M sparsity of every block Linear. ``learned`` holds MaskLLM's options (method 'learned')."""

    name: ClassVar[str] = "sparsify"

    pattern: str = option("2:4", doc="N:M: keep N weights of every M consecutive inputs")
    method: str = option("magnitude", choices=METHODS)
    n_calib: int = option(128, ge=1, doc="calibration images for wanda / sparsegpt (and the learned prior)")
    update_weights: bool = option(True, doc="sparsegpt: OBS update of the kept weights")
    damp: float = option(0.01, ge=0, lt=1, doc="sparsegpt: damping, a fraction of the mean Hessian diagonal (usually 0.01)")
    blocksize: int = option(128, ge=1, doc="sparsegpt: columns per lazy-update block")
    calib_batch_size: int = option(16, ge=1)
    seed: int = option(0, ge=0, le=(1 << 32) - 1, doc="seed of everything random in the stage")
    learned: Any = option(None, doc="MaskLLM's options (method learned); null: their defaults")
    weighting: str = option("uniform", choices=WEIGHTINGS, doc="token weights of the wanda / sparsegpt statistics: uniform or rsq (RSQ)")
    r_min: float = option(DEFAULT_R_MIN, gt=0, le=1, doc="rsq: the least-attended token's weight before the mean-1 rescale")

    def check(self) -> None:
        parse_pattern(self.pattern)
        if self.weighting == "rsq" and self.method == "magnitude":
            raise ConfigError("weighting rsq weights calibration tokens: use it with method wanda, sparsegpt or learned",
                              option=("weighting", "method"))
        # options this method (or uniform weighting) would silently ignore, set away from their defaults
        unused = {"magnitude": ("n_calib", "calib_batch_size", "update_weights", "damp", "blocksize"),
                  "wanda": ("update_weights", "damp", "blocksize"), "learned": ("update_weights",)}.get(self.method, ())
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [n for n in (*unused, *(("r_min",) if self.weighting != "rsq" else ())) if getattr(self, n) != defaults[n]]
        if given:
            names = " and ".join(given)
            raise ConfigError(f"{names} {'do' if len(given) > 1 else 'does'} nothing with method {self.method}, weighting "
                              f"{self.weighting}: drop {names}", option=(*given, "method", "weighting"))
        if self.learned is None or isinstance(self.learned, dict):
            object.__setattr__(self, "learned", NMLearnedConfig.from_dict(self.learned or {}))
        elif not isinstance(self.learned, NMLearnedConfig):
            raise ConfigError("learned must be a mapping of MaskLLM options", option="learned")
        if self.method == "learned" and self.weighting == "rsq" and self.learned.prior in ("magnitude", "none"):
            raise ConfigError(f"weighting rsq weights calibration tokens and prior {self.learned.prior} reads none: use prior "
                              "sparsegpt or wanda, or drop weighting rsq", option=("weighting", "prior"))

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"

    @property
    def learns(self) -> bool:
        return self.method == "learned"

    @property
    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "learned"}
        data["learned"] = self.learned.to_dict()
        return data


@register(NMSparsityConfig)
def sparsify(encoder, config: NMSparsityConfig, calibration_batches=None, run: TrainRun | None = None):
    from mimc.evaluation import fidelity

    n, m = config.nm
    validate_pattern(encoder, n, m)
    if config.method == "learned":
        return learn_nm_masks(encoder, config, calibration_batches, run)
    pixels = calibration_pixels(calibration_batches, config.n_calib, config.calib_batch_size)
    student = clone_encoder(encoder).eval()
    masks = one_shot_sparsify(student, n, m, config.method, pixels, config.update_weights, config.damp, config.blocksize,
                              config.weighting, config.r_min)
    student.config = student.config.replace(nm_pattern=config.pattern)
    check_nm(student)
    metrics: dict[str, Any] = {
        "pattern": config.pattern,
        "method": config.method,
        "density": round(sum(float(k.float().sum()) for k in masks.values()) / sum(k.numel() for k in masks.values()), 6),
        "n_calib": sum(p.shape[0] for p in pixels),
        "weighting": config.weighting,
    }
    if pixels:
        metrics["fidelity_data"] = fidelity(student, encoder, pixels).to_dict()
    else:
        metrics["fidelity_deterministic"] = fidelity(student, encoder, [deterministic_inputs(encoder.config, 8)]).to_dict()
    return student, metrics


__all__ = ["NMSparsityConfig", "sparsify"]
