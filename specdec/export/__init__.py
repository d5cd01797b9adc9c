"""Export of models to deployable graphs (ONNX; TensorRT engines are built from the ONNX graph)."""
