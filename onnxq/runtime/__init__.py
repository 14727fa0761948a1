"""onnxruntime on onnxq models: sessions from the IR, running feeds."""

from onnxq.runtime.session import create_session, run

__all__ = ["create_session", "run"]
