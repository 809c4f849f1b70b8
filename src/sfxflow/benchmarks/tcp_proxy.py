"""A TCP proxy on 127.0.0.1 that plays storage faults for real: an endpoint that goes away
(:meth:`FaultProxy.cut`: connections refused, open ones broken) or a network that drops
packets silently (:meth:`FaultProxy.blackhole`: connections accepted, nothing answered, open
ones stall), until :meth:`FaultProxy.restore`. Used by ``sfxflow bench faults``.
"""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["FaultProxy"]


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``127.0.0.1:target_port``, with faults on demand.

    A connection opened or stalled during a blackhole stays silent for good (its bytes were
    dropped): the client must time out and reconnect, as after a real one.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._silent: set[int] = set()  # ids of sockets whose bytes are dropped
        self._black = False
        self._listener: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()/stop()
                return
            with self._lock:
                if self._black:  # accepted, never answered
                    self._silent.add(id(client))
                    self._conns.append(client)
                    threading.Thread(target=self._drain, args=(client,), daemon=True).start()
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while sock.recv(1 << 16):
                pass

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if id(src) in self._silent or id(dst) in self._silent:
                    continue  # dropped on the floor
                dst.sendall(data)
        except OSError:
            pass
        finally:
            if id(src) not in self._silent:
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and break the open ones (an endpoint gone)."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def blackhole(self) -> None:
        """Drop every byte, in open connections and new ones, without closing anything."""
        with self._lock:
            self._black = True
            self._silent.update(id(s) for s in self._conns)

    def restore(self) -> None:
        """New connections work again (those silenced stay silent)."""
        with self._lock:
            self._black = False
            listening = self._listener is not None
        if not listening:
            self.start()

    def stop(self) -> None:
        self.cut()
        with self._lock:
            silent, self._silent = self._silent, set()
        del silent

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
