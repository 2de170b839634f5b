"""PyTorch side of thzedge: network, checkpoint import, training, ONNX export, quantization, engines.

Only this package imports torch, and only inside the functions that need it.
"""
