"""The Ocellus service."""

import os
import sys

# ONNX Runtime's Linux wheels (1.32) send usage telemetry (1DS) and keep a device id in ~/.cache unless this is set
# before it starts: a model server does not report its traffic to a third party by default. An operator may set it
# to 0. (Unset, an image whose user has no writable home also printed a non-JSON warning line at every start.)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def program_name(module: str) -> str:
    """A console tool's name for its usage line: ``python -m <module>`` when run so, else its script's (ocellus-serve)."""
    return f"python -m {module}" if sys.argv[0].endswith(".py") else os.path.basename(sys.argv[0])
