"""Serving: a Triton model repository and a real tritonserver over it."""
