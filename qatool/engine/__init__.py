"""qatool's numpy autodiff engine over ONNX graphs.

    model = qatool.engine.load("train.onnx")
    outs = model.forward({"input": x}, training=True)
    grads = model.backward([dloss_dout])
"""

from .model import Model, load

__all__ = ["Model", "load"]
