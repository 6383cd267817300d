"""Reference peer: the same push contract as pushservice, written with picows
(the Cython WebSocket library) and redis-py's asyncio client.

Contract: a BRPOP loop on the Redis list QUEUE (producers LPUSH); every item
popped is sent verbatim, as a text frame, to every connected client (picows has
no broadcast helper: the documented way is a loop over the transports).
``GET /healthz`` answers 200 once Redis answered a PING (503 before).

    python picows_peer.py --port 9002 --redis-port 6379 --queue messages
"""
import argparse
import asyncio
import signal
import sys

import redis.asyncio as aioredis
from picows import (
    WSCloseCode,
    WSListener,
    WSMsgType,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

CLIENTS = set()
REDIS_OK = False
BRPOP_TIMEOUT = 5  # s; the loop simply pops again


class ClientListener(WSListener):
    def on_ws_connected(self, transport):
        CLIENTS.add(transport)

    def on_ws_disconnected(self, transport):
        CLIENTS.discard(transport)

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        # Clients have nothing to say in this contract: other frames are ignored.


def listener_factory(request):
    if request.path == b"/healthz":
        if REDIS_OK:
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_ok_response(b"OK\n"), None)
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_error_response(503, b"redis\n"), None)
    return ClientListener()


async def pump(redis, queue):
    global REDIS_OK
    await redis.ping()
    REDIS_OK = True
    while True:
        try:
            popped = await redis.brpop([queue], timeout=BRPOP_TIMEOUT)
        except (ConnectionError, OSError, aioredis.RedisError) as exc:
            print("redis error: %r, retrying" % exc, file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)
            continue
        if popped is None:
            continue
        _key, item = popped
        for transport in CLIENTS:
            transport.send(WSMsgType.TEXT, item)


async def main(args):
    # socket_timeout=None: redis-py >= 8 defaults to 5 s, too short for a
    # connection that sits in BRPOP.
    redis = aioredis.Redis(host="127.0.0.1", port=args.redis_port, db=0,
                           socket_timeout=None)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    server = await ws_create_server(listener_factory, args.host, args.port)
    task = asyncio.create_task(pump(redis, args.queue))
    await stop
    task.cancel()
    server.close()
    for transport in list(CLIENTS):
        transport.send_close(WSCloseCode.GOING_AWAY)
        transport.disconnect()
    await redis.aclose()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-port", type=int, default=6379)
    p.add_argument("--queue", default="messages")
    p.add_argument("--uvloop", action="store_true",
                   help="run on uvloop instead of the stdlib asyncio loop")
    a = p.parse_args()
    if a.uvloop:
        import uvloop
        uvloop.run(main(a))
    else:
        asyncio.run(main(a))
