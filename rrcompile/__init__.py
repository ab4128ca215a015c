"""rrcompile: make trained ONNX networks survive RRAM weight variation."""
