import onnx
import pytest
import torch

from mimc.artifact import save_artifact, state_hash
from mimc.models.io import load_artifact
from mimc.compression.registry import compress
from mimc.pipeline.stages import config_from_dict
from mimc.compression.tokens import TokenReductionConfig
from mimc.errors import ConfigError
from mimc.models.vit import build_encoder, flops_per_image
from tests.conftest import tiny_config, tiny_video_config


def test_config_round_trips_and_rejects_unknown_keys():
    cfg = TokenReductionConfig(method="topk", keep=0.6, at=(2, 3), fuse=False)
    again = config_from_dict("tokens", cfg.to_dict())
    assert again == cfg and again.at == (2, 3)
    with pytest.raises(ConfigError):
        TokenReductionConfig.from_dict({"method": "tome", "r": 2, "ratio": 0.5})
    per_block = TokenReductionConfig.from_dict({"method": "tome", "r": [4, 2, 1]})  # as a YAML recipe writes it
    assert per_block.r_list == (4, 2, 1) and per_block.r == 0
    assert TokenReductionConfig.from_dict(per_block.to_dict()) == per_block


@pytest.mark.parametrize(
    "options",
    [
        {"method": "merge"},
        {"method": "topk", "keep": 0.0},
        {"method": "drop", "keep": 1.01},
        {"method": "tome", "r": -1},
        {"method": "tome", "r": 2, "keep": 0.5},
        {"method": "drop", "r": 2},
        {"method": "drop", "at": (1,)},
        {"method": "topk", "at": (0,)},
        {"method": "drop", "pattern": "random"},
        {"method": "drop", "fuse": False},  # options of another method would be ignored
        {"method": "topk", "pattern": "variance"},
        {"method": "topk", "prop_attn": True},
        {"method": "drop", "inflection": -0.5},
        {"method": "tome", "r_list": (2, 1), "inflection": -0.5},
        # ToMe's inflection runs from -1 (decreasing) to 1 (increasing); past it r goes negative, and
        # nan / inf were a ValueError / OverflowError traceback from int() when the stage ran
        {"method": "tome", "r": 4, "inflection": 2.0},
        {"method": "tome", "r": 4, "inflection": float("nan")},
        {"method": "tome", "r": 4, "inflection": float("-inf")},
    ],
)
def test_bad_options_raise_config_error(options):
    with pytest.raises(ConfigError):
        TokenReductionConfig(**options)


def test_stage_records_metrics_and_leaves_input_untouched(tiny_encoder):
    before = state_hash(tiny_encoder)
    new, record = compress(tiny_encoder, TokenReductionConfig(method="tome", r=2))
    assert state_hash(tiny_encoder) == before and tiny_encoder.config.token_schedule is None
    assert state_hash(new) == before  # same weights: only the schedule changed
    m = record.metrics
    assert m["tokens_per_block"] == [17, 15, 13, 11, 9]
    assert m["macs_reduced"] < m["macs_dense"] == flops_per_image(tiny_encoder.config)
    assert flops_per_image(new.config) == m["macs_reduced"]  # the schedule-aware count everyone uses
    assert m["theoretical_speedup"] > 1.0
    assert 0.9 < m["fidelity_deterministic"]["pooled_cosine_mean"] < 1.0
    assert new.manifest.stages[-1].config["r"] == 2
    with pytest.raises(ConfigError, match="already reduces tokens"):
        compress(new, TokenReductionConfig(method="drop"))


@pytest.mark.parametrize("options", [{"method": "tome", "r": 0}, {"method": "topk", "keep": 1.0}, {"method": "drop", "keep": 1.0},
                                     {"method": "drop", "keep": 0.99, "pattern": "variance"}])
def test_a_schedule_that_removes_no_token_is_refused(tiny_encoder, options):
    with pytest.raises(ConfigError, match="removes no token"):
        compress(tiny_encoder, TokenReductionConfig(**options))


def test_r_too_large_for_the_token_count_is_clipped_as_upstream(tiny_encoder):
    # ToMe merges at most half the unprotected tokens of a block: 16 -> 11 -> 6 patches, then 3 and 1.
    _, record = compress(tiny_encoder, TokenReductionConfig(method="tome", r=5))
    assert record.metrics["schedule"]["r"] == [5, 5, 5, 5]
    assert record.metrics["r_per_block"] == [5, 5, 3, 1]
    assert record.metrics["tokens_per_block"] == [17, 12, 7, 4, 3]
    with pytest.raises(ConfigError, match="beyond"):
        compress(tiny_encoder, TokenReductionConfig(method="topk", at=(5,)))


def test_topk_default_blocks_and_score_follow_the_model(tiny_encoder):
    new, _ = compress(tiny_encoder, TokenReductionConfig(method="topk"))
    sched = new.config.token_schedule
    assert sched["blocks"] == [0, 1, 2] and sched["score"] == "mean"  # MAE-style mean pooling
    cls_model = build_encoder(tiny_config(pooling="cls"), seed=0)
    assert compress(cls_model, TokenReductionConfig(method="topk"))[0].config.token_schedule["score"] == "cls"


@pytest.mark.parametrize("pattern", ["variance", "grid"])
def test_save_load_keeps_schedule_and_outputs(tmp_path, tiny_video_encoder, pattern):
    # grid: the manifest's shape check builds the encoder on the meta device, where the fixed drop
    # pattern must still be computed (it crashed there: "Cannot copy out of meta tensor")
    new, _ = compress(tiny_video_encoder, TokenReductionConfig(method="drop", keep=0.5, pattern=pattern))
    save_artifact(new, tmp_path / "a")
    loaded = load_artifact(tmp_path / "a")
    assert loaded.config.token_schedule == new.config.token_schedule
    assert loaded.manifest.stages[-1].name == "tokens"
    x = torch.randn(2, *new.config.input_shape)
    assert torch.equal(loaded(x).pooled, new(x).pooled)
    assert loaded(x).last_hidden_state.shape[1] == 16  # half of the 2 x 4 x 4 tubes


def _export(encoder, path):
    try:
        from mimc.deploy.onnx import export_onnx
    except ImportError:  # exporter not in this checkout: plain torch export + ORT check
        export_onnx = None
    x = torch.randn(2, *encoder.config.input_shape)
    if export_onnx is not None:
        report = export_onnx(encoder, path, batch=2)
        assert report["validation"]["passed"]
    else:
        class Wrap(torch.nn.Module):
            def __init__(self, enc):
                super().__init__()
                self.enc = enc

            def forward(self, px):
                out = self.enc(px)
                return out.last_hidden_state, out.pooled

        torch.onnx.export(Wrap(encoder), (x,), str(path), dynamo=False, opset_version=17, input_names=["pixel_values"])
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens, pooled = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = encoder(x)
    assert tokens.shape == tuple(ref.last_hidden_state.shape)
    assert abs(torch.from_numpy(pooled) - ref.pooled).max() < 1e-4
    return onnx.load(str(path))


@pytest.mark.parametrize(
    "make,options",
    [
        (tiny_config, {"method": "tome", "r": 3, "prop_attn": True}),
        (tiny_config, {"method": "topk", "keep": 0.5, "at": (2, 3)}),
        (tiny_config, {"method": "drop", "keep": 0.5, "pattern": "variance"}),
        (tiny_video_config, {"method": "tome", "r": 2}),
        (tiny_video_config, {"method": "topk", "keep": 0.6, "at": (1, 3), "fuse": False}),
        (tiny_video_config, {"method": "drop", "keep": 0.5, "pattern": "grid"}),
    ],
)
def test_export_matches_torch_with_static_shapes(tmp_path, make, options):
    encoder = build_encoder(make(), seed=0)
    new, record = compress(encoder, TokenReductionConfig(**options))
    graph = _export(new, tmp_path / "model.onnx")
    ops = {n.op_type for n in graph.graph.node}
    assert not ops & {"ScatterElements", "ScatterND", "Scatter", "NonZero", "Loop"}  # TensorRT-friendly
    out_tokens = graph.graph.output[0].type.tensor_type.shape.dim[1].dim_value
    assert out_tokens == record.metrics["tokens_per_block"][-1]  # a static token count in the graph
