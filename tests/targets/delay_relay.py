"""delay_relay: a TCP relay that delays every byte by DELAY_MS in each direction.

Used by tests/net.rs in place of `tc qdisc ... netem delay` on kernels built without netem
(CONFIG_NET_SCH_NETEM unset): it listens on LISTEN_HOST:LISTEN_PORT, connects each accepted
connection to TO_HOST:TO_PORT, and forwards what it reads in each direction DELAY_MS later,
in order. An end of stream (or a reset) on one side closes both: a page server that dies is
seen by the client as a lost connection, as it would be without the relay.

usage: delay_relay.py LISTEN_HOST LISTEN_PORT TO_HOST TO_PORT DELAY_MS
Prints "RELAY READY" once listening.
"""

import asyncio
import sys


async def pipe(reader, writer, delay, other):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def send():
        while True:
            at, data = await queue.get()
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        writer.close()
        other.close()

    sender = asyncio.create_task(send())
    try:
        while True:
            data = await reader.read(256 * 1024)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                break
    except (ConnectionError, OSError):
        queue.put_nowait((loop.time() + delay, b""))
    try:
        await sender
    except (ConnectionError, OSError):
        writer.close()
        other.close()


async def main():
    lhost, lport, thost, tport, delay_ms = sys.argv[1:6]
    delay = float(delay_ms) / 1000.0

    async def handle(creader, cwriter):
        try:
            sreader, swriter = await asyncio.open_connection(thost, int(tport))
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(
            pipe(creader, swriter, delay, cwriter),
            pipe(sreader, cwriter, delay, swriter),
            return_exceptions=True,
        )

    server = await asyncio.start_server(handle, lhost, int(lport))
    print("RELAY READY", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
