"""The quantize stage's options (:class:`QuantizeConfig`): precision, calibration, layout target and
the checks that refuse combinations that would do nothing. The flow that applies them is
:mod:`mimc.quant.quantize`."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from mimc.errors import ConfigError
from mimc.options import StageConfig, option
from mimc.quant.calibrate import METHODS

PRECISIONS = ("int8", "fp8")
TARGETS = ("cpu", "tensorrt", "openvino")
PERCENTILE = 99.99


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(StageConfig):
    """Options of the graph-level quantize stage; ``target`` None picks cpu for int8, tensorrt for fp8."""

    name: ClassVar[str] = "quantize"
    needs_data: ClassVar[bool] = True
    precision: str = option("int8", choices=PRECISIONS)
    method: str = option("percentile", choices=METHODS, doc="calibration range method")
    n: int = option(256, ge=1, doc="calibration images")
    percentile: float = option(PERCENTILE, ge=90, le=100, doc="percentile kept by method percentile")
    smooth: float | None = option(None, ge=0, le=1, doc="SmoothQuant alpha, folded into the graph before calibration")
    repq: bool = False
    quantize_attention_matmuls: bool = option(False, doc="also quantize the two attention matmuls")
    target: str | None = option(None, choices=TARGETS, doc="graph layout (cpu: ONNX Runtime, tensorrt, openvino); null: cpu for int8, "
                                                        "tensorrt for fp8")
    overflow_fix: str | None = option(None, choices=("none", "first_layer", "all"),
                                      doc="openvino target: layers with 7-bit weights; null: first_layer with VNNI, measured without")
    fuse_attention: bool = option(True, doc="cpu target: run qkv + attention as one QAttention kernel")

    def check(self) -> None:
        if self.precision == "fp8" and self.target == "cpu":
            raise ConfigError("fp8 Q/DQ graphs run on TensorRT (Hopper/Ada), not on ONNX Runtime CPU: give target tensorrt "
                              "or precision int8", option=("target", "precision"))
        if self.overflow_fix is not None and self.resolved_target != "openvino":
            raise ConfigError(f"overflow_fix applies to the openvino target's int8 weights, not {self.resolved_target}: "
                              "drop it or give target openvino", option=("overflow_fix", "target"))
        if self.percentile != PERCENTILE and self.method != "percentile":
            raise ConfigError(f"percentile clips the default calibration method's range, not {self.method}'s: drop it, or drop method",
                              option=("percentile", "method"))
        if not self.fuse_attention and (self.resolved_target != "cpu" or self.quantize_attention_matmuls):
            raise ConfigError("fuse_attention false changes nothing here: only the cpu target fuses attention, and not with "
                              "quantize_attention_matmuls; drop it", option=("fuse_attention", "quantize_attention_matmuls"))
        if self.precision == "fp8" and self.target == "openvino":
            raise ConfigError("OpenVINO's CPU plugin has no FP8 kernels: give precision int8, or target tensorrt for FP8",
                              option=("target", "precision"))

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data["overflow_fix"] is None:  # an openvino-only option: other targets' records stay as they were
            del data["overflow_fix"]
        return data

    @property
    def resolved_overflow_fix(self) -> str:
        if self.resolved_target != "openvino":
            return "none"
        if self.overflow_fix is None:
            from mimc.runtime.openvino import cpu_vnni

            return "first_layer" if cpu_vnni()["supported"] else "all"
        return self.overflow_fix

    @property
    def resolved_target(self) -> str:
        return self.target or ("tensorrt" if self.precision == "fp8" else "cpu")


__all__ = ["QuantizeConfig", "PRECISIONS", "TARGETS", "PERCENTILE"]
