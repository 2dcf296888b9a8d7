"""What a ``send`` costs the sender when it wakes a reader sleeping on the other CPU.

A thread on CPU 1 reads a loopback TCP connection; the main thread on CPU 0 sends 3,000
messages of 60 bytes, ``GAP`` seconds apart, and prints its CPU time per ``send``.

    .venv/bin/python bench/results/2026-12-08-fsync-acker/wake_send.py GAP   # 0, 0.0005
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

N = 3000
SIZE = 60


def main() -> None:
    gap = float(sys.argv[1])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    sender = socket.create_connection(listener.getsockname())
    sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    receiver, _ = listener.accept()

    def read() -> None:
        os.sched_setaffinity(0, {1})
        got = 0
        while got < N * SIZE:
            got += len(receiver.recv(100_000))

    reader = threading.Thread(target=read)
    reader.start()
    os.sched_setaffinity(0, {0})
    cpu = 0.0
    for _ in range(N):
        start = time.thread_time()
        sender.send(b"x" * SIZE)
        cpu += time.thread_time() - start
        if gap:
            time.sleep(gap)
    reader.join()
    print(f"gap {gap * 1e6:.0f} us: send CPU {cpu / N * 1e6:.1f} us")


if __name__ == "__main__":
    main()
