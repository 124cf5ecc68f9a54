"""tcp_blast: the raw TCP baseline of figure 8 (umm-bench): one connection, as fast as Python
can push it (large sendall / recv_into, so the kernel does the work).

  tcp_blast.py serve HOST PORT BYTES   listen, print "BLAST READY", send BYTES to each client
  tcp_blast.py get HOST PORT BYTES     connect, read BYTES, print
                                       "RESULT bytes=N us=T" (T: first byte to last byte)
"""

import socket
import sys
import time

BUF = 4 << 20


def serve(host, port, total):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(4)
    print("BLAST READY", flush=True)
    data = b"\xa5" * BUF
    while True:
        c, _ = s.accept()
        left = total
        try:
            while left > 0:
                n = min(left, BUF)
                c.sendall(data[:n] if n < BUF else data)
                left -= n
        except OSError:
            pass
        c.close()


def get(host, port, total):
    c = socket.create_connection((host, port), timeout=60)
    buf = bytearray(BUF)
    view = memoryview(buf)
    got, first = 0, None
    while got < total:
        n = c.recv_into(view)
        if n == 0:
            sys.exit("tcp_blast: the sender closed after %d of %d bytes" % (got, total))
        if first is None:
            first = time.monotonic()
        got += n
    us = (time.monotonic() - first) * 1e6
    print("RESULT bytes=%d us=%d" % (got, us), flush=True)


if __name__ == "__main__":
    mode, host, port, total = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    (serve if mode == "serve" else get)(host, port, total)
