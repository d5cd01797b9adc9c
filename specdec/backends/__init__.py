"""Built-in backends, registered through the plugin manager like any third-party plugin."""

from specdec.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    from specdec.backends.onnxruntime import OnnxRuntimeBackend
    from specdec.backends.pytorch import PyTorchBackend
    from specdec.backends.tensorrt import TensorRTBackend

    register(PyTorchBackend)
    register(OnnxRuntimeBackend)
    register(TensorRTBackend)
