"""ONNX graph utilities: graph files (:mod:`mimc.graph.files`) and what a graph says (:mod:`mimc.graph.info`).

Everything here reads and writes graph files; nothing runs them (that is :mod:`mimc.runtime`).
"""
from mimc.graph.files import (EXTERNAL_DATA_BYTES, check_graph, external_file, initializer_bytes, load_graph,
                              offload_tensors, read_tensor, save_graph, tensor_bytes, uses_external)
from mimc.graph.info import (ENCODER_CONFIG_KEY, FLOAT8_TYPES, FLOAT_TYPES, VERSION_KEY, encoder_config_dict,
                             encoder_config_of_graph, graph_inputs, graph_precision, input_dims, is_mimc_graph, metadata,
                             read_nm_pattern, single_input, token_reduced)

__all__ = ["load_graph", "save_graph", "offload_tensors", "read_tensor", "check_graph", "initializer_bytes", "tensor_bytes",
           "external_file", "uses_external", "EXTERNAL_DATA_BYTES", "metadata", "is_mimc_graph", "encoder_config_dict",
           "encoder_config_of_graph", "token_reduced", "read_nm_pattern", "graph_inputs", "input_dims", "single_input",
           "graph_precision", "ENCODER_CONFIG_KEY", "VERSION_KEY", "FLOAT8_TYPES", "FLOAT_TYPES"]
