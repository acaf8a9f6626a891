"""Inference sessions over backends (PyTorch, ONNX Runtime, TensorRT) and the shared generation loop."""
