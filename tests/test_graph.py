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


# External data ------------------------------------------------------------------------------------
def _weights_graph(*arrays):
    """x -> x @ w0 @ w1 ... with the weights as initializers."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    for k, w in enumerate(arrays):
        inits.append(numpy_helper.from_array(np.asarray(w, np.float32), f"w{k}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{k}"], [f"y{k}"]))
        x = f"y{k}"
    d = arrays[0].shape[0]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, arrays[-1].shape[1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_save_graph_decides_from_initializer_bytes_and_streams_them_beside_the_graph(tmp_path, monkeypatch):
    import numpy as np

    import mimc.graph.files as graph_mod
    from mimc.graph import initializer_bytes, read_tensor, save_graph
    from mimc.runtime.session import run_onnx

    rng = np.random.default_rng(0)
    big, small = rng.standard_normal((512, 512)).astype(np.float32), rng.standard_normal((512, 4)).astype(np.float32)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    expected = x @ big @ small
    assert initializer_bytes(_weights_graph(big, small)) == big.nbytes + small.nbytes
    assert save_graph(_weights_graph(big, small), tmp_path / "inline.onnx") is None  # far below the limit
    monkeypatch.setattr(graph_mod, "EXTERNAL_DATA_BYTES", big.nbytes)  # now the sum is past it
    model = _weights_graph(big, small)
    assert save_graph(model, tmp_path / "g.onnx") == "g.onnx.data"
    assert all(not t.raw_data for t in model.graph.initializer)  # written out, not held twice
    loaded = load_graph(tmp_path / "g.onnx", external_data=False)
    offsets = {t.name: int({e.key: e.value for e in t.external_data}["offset"]) for t in loaded.graph.initializer}
    assert offsets["w0"] % graph_mod.ALIGN == 0  # a 1 MiB tensor starts on 64 KiB: ONNX Runtime can map it
    assert initializer_bytes(loaded) == big.nbytes + small.nbytes
    np.testing.assert_array_equal(read_tensor(loaded.graph.initializer[0], tmp_path), big)
    np.testing.assert_allclose(run_onnx(tmp_path / "g.onnx", x)["y1"], expected, rtol=1e-4, atol=1e-4)
    # re-saved from external data: copied across (streamed) or pulled back inline, same values
    (tmp_path / "copy").mkdir()
    assert save_graph(load_graph(tmp_path / "g.onnx", external_data=False), tmp_path / "copy" / "c.onnx", base_dir=tmp_path) == "c.onnx.data"
    assert save_graph(load_graph(tmp_path / "g.onnx", external_data=False), tmp_path / "copy" / "i.onnx", base_dir=tmp_path,
                      external=False) is None
    for name in ("c.onnx", "i.onnx"):
        np.testing.assert_allclose(run_onnx(tmp_path / "copy" / name, x)["y1"], expected, rtol=1e-4, atol=1e-4)


def test_tensors_in_one_file_each_are_merged_into_one_data_file(tmp_path, monkeypatch):
    """What the TorchScript exporter writes past 2 GiB: a file per tensor, no offsets or lengths."""
    import numpy as np
    import onnx

    import mimc.graph.files as graph_mod
    from mimc.graph import save_graph
    from mimc.runtime.session import run_onnx

    rng = np.random.default_rng(1)
    ws = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3)]
    model = _weights_graph(*ws)
    raw = tmp_path / "raw"
    raw.mkdir()
    for t in model.graph.initializer:
        (raw / t.name).write_bytes(t.raw_data)
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", t.name
    monkeypatch.setattr(graph_mod, "EXTERNAL_DATA_BYTES", 0)
    assert save_graph(model, tmp_path / "m.onnx", base_dir=raw) == "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "raw"]
    x = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x)["y2"], x @ ws[0] @ ws[1] @ ws[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("location, offset, length, match", [
    ("../outside.data", 0, 16, "outside its graph's folder"),
    ("/etc/passwd", 0, 16, "outside its graph's folder"),
    ("w.data", 0, 1 << 20, "truncated or not this graph's"),
    ("gone.data", 0, 16, "missing or unreadable"),
])
def test_external_data_that_points_elsewhere_or_past_its_file_is_refused(tmp_path, location, offset, length, match):
    import numpy as np
    import onnx

    from mimc.graph import read_tensor, save_graph

    (tmp_path / "w.data").write_bytes(b"\0" * 64)
    (tmp_path / "outside.data").write_bytes(b"\0" * 64)
    sub = tmp_path / "graph"
    sub.mkdir()
    (sub / "w.data").write_bytes(b"\0" * 64)
    model = _weights_graph(np.zeros((2, 2), np.float32))
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    for call in (lambda: read_tensor(t, sub), lambda: save_graph(model, tmp_path / "out.onnx", base_dir=sub, external=True)):
        with pytest.raises(BadInputError, match=match):
            call()


def test_a_symlink_out_of_the_graph_folder_is_refused(tmp_path):
    import numpy as np
    import onnx

    from mimc.graph import read_tensor

    secret = tmp_path / "secret"
    secret.write_bytes(b"\1" * 16)
    sub = tmp_path / "graph"
    sub.mkdir()
    (sub / "w.data").symlink_to(secret)
    t = _weights_graph(np.zeros((2, 2), np.float32)).graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "w.data"
    with pytest.raises(BadInputError, match="outside its graph's folder"):
        read_tensor(t, sub)


def test_reading_a_graph_without_weights_leaves_them_in_the_file(tmp_path):
    """load_graph(external_data=False) on a single-file graph: structure and metadata only, every
    weight of 1 KiB or more an offset into the graph file itself, read back exactly on demand."""
    import numpy as np
    import onnx

    from mimc.graph import read_tensor, save_graph

    rng = np.random.default_rng(2)
    ws = [rng.standard_normal((64, 64)).astype(np.float32), rng.standard_normal((64, 2)).astype(np.float32)]
    model = _weights_graph(*ws)
    model.metadata_props.add(key="mimc_version", value="x")
    save_graph(model, tmp_path / "g.onnx")  # one file
    full = onnx.load(str(tmp_path / "g.onnx"))
    light = load_graph(tmp_path / "g.onnx", external_data=False)
    assert [n.SerializeToString() for n in light.graph.node] == [n.SerializeToString() for n in full.graph.node]
    assert light.metadata_props == full.metadata_props and light.graph.input == full.graph.input
    w0, w1 = light.graph.initializer
    assert w0.data_location == onnx.TensorProto.EXTERNAL and not w0.raw_data
    assert {e.key: e.value for e in w0.external_data}["location"] == "g.onnx"
    assert w1.raw_data and w1.data_location != onnx.TensorProto.EXTERNAL  # 512 bytes: stays in the proto
    np.testing.assert_array_equal(read_tensor(w0, tmp_path), ws[0])
    np.testing.assert_array_equal(read_tensor(w1), ws[1])
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes((tmp_path / "g.onnx").read_bytes()[:3000])
    with pytest.raises(BadInputError, match="not a readable ONNX model"):
        load_graph(truncated, external_data=False)


@pytest.mark.parametrize("manifest", ["[]", '{"encoder": {"nm_pattern": "2:4"}}'])
def test_the_nm_pattern_of_an_unstamped_graph_comes_from_a_checked_manifest(tmp_path, graph, manifest):
    # before: mimc.json beside a graph without mimc's metadata was read by hand, unchecked: a list there
    # was an AttributeError traceback, and an edited (unhashed) nm_pattern was believed
    from mimc.errors import NotAModelError

    path, _ = graph
    model = load_graph(path, external_data=False)
    del model.metadata_props[:]  # a graph exported by another tool
    (tmp_path / "mimc.json").write_text(manifest)
    with pytest.raises(NotAModelError, match="mimc.json"):
        read_nm_pattern(tmp_path / "model.onnx", model)
