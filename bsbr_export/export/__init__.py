"""Writing artifacts: the exported graphs, the format table, ONNX/TorchScript/AOTInductor/ExecuTorch
writers, the export job and its manifest."""
