"""The inference engine: ONNX Runtime sessions for local encoders and decoders."""
