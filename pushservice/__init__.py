"""pushservice: real-time push over WebSocket, fed by a Redis list; run it with ``twistd pushservice``."""

__version__ = "0.2.0"
__all__ = ["__version__"]
