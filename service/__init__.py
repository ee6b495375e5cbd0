"""The Ocellus service."""

import os

# ONNX Runtime's Linux wheels (1.32) send usage telemetry (1DS) and keep a device id in ~/.cache unless this is set
# before it starts: a model server does not report its traffic to a third party by default. An operator may set it
# to 0. (Unset, an image whose user has no writable home also printed a non-JSON warning line at every start.)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
