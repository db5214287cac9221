"""A tiny "pod": TCP and UDP servers that say who they are and who they see.

TCP: on connect, sends "<name> <peer ip>\\n", then answers every line "x" with
"<name> x\\n" (so a test can keep a connection open and keep talking).
UDP: answers every datagram with "<name> <peer ip>\\n".
Prints "ready" once both sockets listen. Run inside a network namespace.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading


def serve_tcp(name: str, sock: socket.socket) -> None:
    while True:
        conn, peer = sock.accept()
        threading.Thread(target=handle, args=(name, conn, peer), daemon=True).start()


def handle(name: str, conn: socket.socket, peer: tuple[str, int]) -> None:
    with conn:
        conn.sendall(f"{name} {peer[0]}\n".encode())
        buf = b""
        while True:
            data = conn.recv(4096)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                conn.sendall(f"{name} ".encode() + line + b"\n")


def serve_udp(name: str, sock: socket.socket) -> None:
    while True:
        _, peer = sock.recvfrom(4096)
        sock.sendto(f"{name} {peer[0]}\n".encode(), peer)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, action="append", required=True)
    args = parser.parse_args()
    threads = []
    for port in args.port:
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(("0.0.0.0", port))
        tcp.listen(128)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", port))
        threads.append(threading.Thread(target=serve_tcp, args=(args.name, tcp), daemon=True))
        threads.append(threading.Thread(target=serve_udp, args=(args.name, udp), daemon=True))
    for thread in threads:
        thread.start()
    print("ready", flush=True)
    sys.stdin.read()  # exit when the test closes our stdin (or dies)


if __name__ == "__main__":
    main()
