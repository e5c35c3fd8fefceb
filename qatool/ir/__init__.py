"""Graph IR over ONNX: import/export at the edges, plain Python objects in between."""

from .graph import Graph, Node, ValueInfo, from_onnx, to_onnx
from .io import load_graph, load_proto, save_graph, save_proto

__all__ = ["Graph", "Node", "ValueInfo", "from_onnx", "to_onnx", "load_graph", "load_proto", "save_graph", "save_proto"]
