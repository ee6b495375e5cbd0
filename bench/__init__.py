"""Ocellus benchmarks, run by hand."""

import service  # noqa: F401  (first: it turns ONNX Runtime's telemetry off before ONNX Runtime loads)
