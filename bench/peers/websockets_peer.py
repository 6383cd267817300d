"""Reference peer: the same push contract as pushservice, written the way the
`websockets` documentation recommends (asyncio server + ``broadcast()``).

Contract: a BRPOP loop on the Redis list QUEUE (producers LPUSH); every item
popped is broadcast verbatim, as a text frame, to every open connection.
``GET /healthz`` answers 200 once Redis answered a PING (503 before).

    python websockets_peer.py --port 9001 --redis-port 6379 --queue messages
"""
import argparse
import asyncio
import http
import signal
import sys

import redis.asyncio as aioredis
from websockets.asyncio.server import broadcast, serve

CONNECTIONS = set()
REDIS_OK = False
BRPOP_TIMEOUT = 5  # s; the loop simply pops again


async def handler(websocket):
    # Register the client, then just wait until it goes away.
    CONNECTIONS.add(websocket)
    try:
        await websocket.wait_closed()
    finally:
        CONNECTIONS.discard(websocket)


def health_check(connection, request):
    if request.path == "/healthz":
        if REDIS_OK:
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "redis\n")
    return None


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
        # bytes + text=True: a text frame carrying the item as it was pushed.
        broadcast(CONNECTIONS, item, text=True)


async def main(args):
    # socket_timeout=None: redis-py >= 8 defaults to 5 s, too short for a
    # connection that sits in BRPOP.
    redis = aioredis.Redis(host="127.0.0.1", port=args.redis_port, db=0,
                           socket_timeout=None)
    stop = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, args.host, args.port,
                     process_request=health_check):
        task = asyncio.create_task(pump(redis, args.queue))
        await stop
        task.cancel()
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
