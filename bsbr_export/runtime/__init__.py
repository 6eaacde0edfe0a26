"""Runners: load an artifact (or the eager model) and run it, behind one contract
(`runtime.base.Runner`), below export and proof as Polygraphy's backends sit below its
comparator. Each row of `formats.FORMATS` names its runner; `runtime.artifacts.open_artifact`
opens an artifact with it.

Importing this package imports no torch: generation and batching over ONNX Runtime
(`runtime.generate`'s sampling, `runtime.batching`) run in a serving process that has
numpy, onnxruntime and tokenizers only.
"""
