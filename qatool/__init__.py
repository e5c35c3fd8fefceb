"""qatool: quantization-aware training of ONNX models on the ONNX file itself."""

__version__ = "0.1.0"
