"""twistd dropin: ``twistd pushservice``. Imports nothing heavy (see pushservice.tap)."""

from twisted.application.service import ServiceMaker

pushservice = ServiceMaker(
    "pushservice",
    "pushservice.tap",
    "Real-time push over WebSocket, fed by a Redis list",
    "pushservice",
)
