"""Token reduction stage: ToMe merging, EViT-style attention top-k, MAE-native patch dropping.

References:
- ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv 2210.09461),
  github.com/facebookresearch/ToMe.
- EViT: Liang et al., "Not All Patches are What You Need", ICLR 2022 (arXiv 2202.07800),
  github.com/youweiliang/evit.
- MAE: He et al., CVPR 2022 (arXiv 2111.06377), github.com/facebookresearch/mae; VideoMAE: Tong et
  al., NeurIPS 2022 (arXiv 2203.12602), github.com/MCG-NJU/VideoMAE (tube masking).

The stage changes no weight: it writes a static ``token_schedule`` into the encoder config, and the
encoder (``mimc.models.vit``) turns it into fixed per-block token counts, so the result exports to
ONNX with static shapes. The tensor work lives in :mod:`mimc.models.token_ops`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mimc.data import deterministic_inputs
from mimc.errors import ConfigError
from mimc.models import token_ops
from mimc.models.vit import Encoder, blank_encoder, flops_per_image
from mimc.compression.registry import StageConfig, register
from mimc.options import option

DEFAULT_KEEP = {"topk": 0.7, "drop": 0.5}
EVIT_BLOCKS = (4, 7, 10)  # EViT's reorganisation blocks for a 12-block ViT (1-based)


@dataclasses.dataclass(frozen=True)
class TokenReductionConfig(StageConfig):
    """Options of the ``tokens`` stage.

    - ``tome``: ``r`` tokens merged per block (an int), or a per-block list in ``r_list``;
      ``inflection`` < 0 makes the int schedule decrease over depth (ToMe's (r, inflection)).
      ``prop_attn`` adds log(size) to attention logits (off: off-the-shelf MAE weights never saw it).
      As in the published code, a block merges at most half its unprotected tokens, so a large r
      is clipped per block (ViT-B with r=16 merges 10 in block 12); the metrics list what runs.
    - ``topk``: keep ``keep`` of the patch tokens at blocks ``at`` (1-based, as in the EViT paper;
      empty: EViT's 4, 7, 10 scaled to the depth), ``fuse`` the rest into one token.
    - ``drop``: keep ``keep`` of the patches before block 1, by a fixed ``grid`` pattern (a tube
      pattern for video) or per image by patch pixel ``variance``.
    """

    name: ClassVar[str] = "tokens"

    method: str = option("tome", choices=token_ops.METHODS)
    r: int = option(0, ge=0, doc="tokens merged per block (ToMe)")
    r_list: tuple[int, ...] = option((), ge=0, doc="tokens merged at each block (ToMe)")
    inflection: float = option(0.0, ge=-1, le=1, doc="ToMe: -1 decreasing over depth, 0 constant, 1 increasing")
    keep: float | None = option(None, gt=0, le=1, doc="fraction of patch tokens kept; null: 0.7 for topk, 0.5 for drop")
    at: tuple[int, ...] = option((), ge=1, doc="1-based blocks where topk reduces tokens")
    fuse: bool = True
    pattern: str = option("grid", choices=token_ops.PATTERNS)
    prop_attn: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, (list, tuple)) and not self.r_list:  # r: [8, 8, 4] in a recipe = one value per block
            object.__setattr__(self, "r_list", tuple(self.r))
            object.__setattr__(self, "r", 0)
        super().__post_init__()

    def check(self) -> None:
        if self.method == "tome" and not self.r and not any(self.r_list):  # found when read, not after the stages before it ran
            raise ConfigError("method tome removes no token without r: give r (tokens merged per block, e.g. 8, "
                              "or one value per block: 16,12,8)", option="r")
        if self.method == "tome" and self.r_list and self.r:
            raise ConfigError("give either r or r_list for ToMe, not both", option=("r", "r_list"))
        if self.method == "tome" and self.keep is not None:
            raise ConfigError("ToMe takes r (tokens merged per block), not keep: give r", option=("r", "keep"))
        if self.method != "tome" and (self.r or self.r_list):
            raise ConfigError(f"method '{self.method}' takes keep, not r: give keep", option=("method", "keep", "r"))
        if self.method != "topk" and self.at:
            raise ConfigError("at only applies to method topk", option=("at", "method"))
        # an option another method's schedule would silently ignore (name, its method, set away from its default)
        for name, owner, given in (("fuse", "topk", not self.fuse), ("pattern", "drop", self.pattern != "grid"),
                                   ("prop_attn", "tome", self.prop_attn), ("inflection", "tome", bool(self.inflection))):
            if given and self.method != owner:
                raise ConfigError(f"{name} only applies to method {owner}: drop it", option=(name, "method"))
        if self.inflection and self.r_list:
            raise ConfigError("inflection shapes a single r over depth; a per-block r list ignores it: drop inflection",
                              option=("inflection", "r"))

    @property
    def keep_rate(self) -> float:
        return float(self.keep) if self.keep is not None else DEFAULT_KEEP.get(self.method, 1.0)

    def schedule(self, encoder_config: Any) -> dict[str, Any]:
        """The static ``token_schedule`` for an encoder of this shape (validated by building its plan)."""
        cfg = encoder_config
        if self.method == "tome":
            r = list(self.r_list) if self.r_list else self.r
            sched: dict[str, Any] = {"method": "tome", "r": token_ops.tome_r_list(cfg.depth, r, self.inflection), "prop_attn": self.prop_attn}
        elif self.method == "topk":
            at = self.at or tuple(sorted({max(1, round(b * cfg.depth / 12)) for b in EVIT_BLOCKS}))
            sched = {
                "method": "topk",
                "keep": self.keep_rate,
                "blocks": [b - 1 for b in at],
                "fuse": self.fuse,
                "score": "cls" if cfg.pooling == "cls" else "mean",
            }
        else:
            sched = {"method": "drop", "keep": self.keep_rate, "pattern": self.pattern}
        token_ops.build_plan(cfg.replace(token_schedule=sched))  # raises ConfigError when it cannot run
        return sched


@register(TokenReductionConfig)
def reduce_tokens(encoder: Encoder, config: TokenReductionConfig, calibration_batches=None) -> tuple[Encoder, dict[str, Any]]:
    from mimc.evaluation import fidelity

    cfg = encoder.config
    if cfg.token_schedule:
        raise ConfigError(f"this model already reduces tokens ({cfg.token_schedule.get('method')}): apply mimc tokens to the model before its first token stage")
    schedule = config.schedule(cfg)
    new = blank_encoder(cfg.replace(token_schedule=schedule))  # the same weights; ``encoder`` is untouched
    new.load_state_dict(encoder.state_dict())
    new.eval()
    plan = new.token_plan
    if min(plan.counts) == cfg.num_tokens:  # keep 1, r 0, or a keep that rounds to every patch: the dense model
        raise ConfigError(f"this {config.method} schedule removes no token ({cfg.num_tokens} in every block): "
                          + ("raise r" if config.method == "tome" else "give keep below 1"), option="r" if config.method == "tome" else "keep")
    macs_dense, macs_reduced = flops_per_image(cfg), token_ops.reduced_macs(new.config, plan)
    # Mean tokens per block, weighted like the work: what "x % of the tokens" means in the benchmark.
    mean_tokens = sum(plan.counts[:-1]) / max(1, cfg.depth)
    metrics: dict[str, Any] = {
        "method": config.method,
        "schedule": schedule,
        "tokens_per_block": plan.counts,
        **({"r_per_block": plan.merge_r} if config.method == "tome" else {}),
        "token_fraction": round(mean_tokens / cfg.num_tokens, 6),
        "macs_dense": macs_dense,
        "macs_reduced": macs_reduced,
        "macs_ratio": round(macs_reduced / macs_dense, 6),
        "theoretical_speedup": round(macs_dense / macs_reduced, 4),
        # Fidelity to the input encoder (the dense source when this is the first stage).
        "fidelity_deterministic": fidelity(new, encoder, deterministic_inputs(cfg, batch=4, seed=0)).to_dict(),
    }
    if calibration_batches is not None:
        metrics["fidelity_data"] = fidelity(new, encoder, list(calibration_batches)).to_dict()
    return new, metrics


__all__ = ["TokenReductionConfig", "reduce_tokens"]
