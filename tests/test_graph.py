"""mimc.graph: loading, mimc metadata, input specs and precision of ONNX graphs."""
from __future__ import annotations

import pytest

from mimc.deploy.onnx import export_onnx
from mimc.errors import BadInputError, DataError
from mimc.graph import (encoder_config_of_graph, graph_inputs, graph_precision, input_dims, is_mimc_graph, load_graph,
                        read_nm_pattern, single_input, token_reduced)
from mimc.models.vit import build_encoder
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    enc = build_encoder(tiny_config(), seed=0)
    path = tmp_path_factory.mktemp("g") / "model.onnx"
    export_onnx(enc, path, batch="dynamic")
    return path, enc


def test_reads_what_export_stamped(graph):
    path, enc = graph
    model = load_graph(path, external_data=False)
    assert is_mimc_graph(path, model) and not token_reduced(model)
    assert encoder_config_of_graph(path) == enc.config
    assert graph_precision(model) == "fp32" and read_nm_pattern(path, model) is None
    (spec,) = graph_inputs(model)
    assert spec["name"] == "pixel_values" and spec["shape"][0] is None and spec["dtype"] == "tensor(float)"
    assert input_dims(model) == {"pixel_values": spec["shape"]}
    name, batch, shape = single_input(model)
    assert (name, batch, shape) == ("pixel_values", None, tuple(enc.config.input_shape))


def test_unreadable_and_missing_files_are_one_line(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_graph(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a graph")
    with pytest.raises(BadInputError, match="not a readable ONNX model"):
        load_graph(junk)


def test_single_input_refuses_two_inputs():
    import onnx
    from onnx import TensorProto, helper

    a, b, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3]) for n in "aby")
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b], [y]))
    assert isinstance(model, onnx.ModelProto)
    with pytest.raises(DataError, match="2 inputs"):
        single_input(model)
