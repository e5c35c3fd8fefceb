"""qatool's numpy autodiff engine over ONNX graphs.

    model = qatool.engine.load("train.onnx")
    outs = model.forward({"input": x}, training=True)
    grads = model.backward([dloss_dout])

A program that trains for many steps should call `keep_freed_memory()` first (the command line does): see
qatool.engine.allocator.
"""

from .allocator import keep_freed_memory
from .model import Model, load

__all__ = ["Model", "keep_freed_memory", "load"]
