"""Ocellus training recipes."""

import service  # noqa: F401  (first: it turns ONNX Runtime's telemetry off before ONNX Runtime loads)
