"""Exports of the model to other runtimes (ONNX: the decoder for browsers, the encoder for servers)."""
