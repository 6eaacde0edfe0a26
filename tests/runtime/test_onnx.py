"""ONNX Runtime's runner: an IOBinding run (how the CUDA engines are timed, feeds bound on
the device once) gives what a plain run gives."""

import numpy as np

from bsbr_export.manifest import manifest_spec
from bsbr_export.proof.bench import spec_feeds
from bsbr_export.runtime.onnx import OnnxRunner


def test_a_bound_run_gives_what_a_plain_run_gives(tiny_onnx_export):
    spec = manifest_spec(tiny_onnx_export)
    path = tiny_onnx_export / "model.onnx"
    feeds = spec_feeds(spec, 2, 2 * spec.chunk_size + 5, seed=3)  # not a multiple of the chunk size
    plain = OnnxRunner(path).infer(feeds)["logits"]
    bound = OnnxRunner(path, io_binding=True)
    np.testing.assert_allclose(bound.infer(feeds)["logits"], plain, rtol=0, atol=1e-6)
    run = bound.prepare(feeds)  # bound once, run twice: the same outputs each time
    first, second = run().copy_outputs_to_cpu()[0], run().copy_outputs_to_cpu()[0]
    np.testing.assert_allclose(first, plain, rtol=0, atol=1e-6)
    assert np.array_equal(first, second)
    assert not np.array_equal(plain[0], plain[1])  # the rows differ: the feeds are real
