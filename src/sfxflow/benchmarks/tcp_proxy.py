"""A TCP proxy on 127.0.0.1 that can be cut and restored, to play a storage outage for real (used
by ``sfxflow bench faults`` and the storage-outage tests).

While cut, the listening socket is closed (new connections are refused) and every open
connection is closed (requests in flight break), as when an endpoint goes away.

While a blackhole (:meth:`TcpProxy.blackhole`), connections are still accepted but nothing is
forwarded either way and nothing is closed, as when packets are dropped silently (a firewall, a
dead route): only a timeout ends a request. The connections open during a blackhole stay dead
after :meth:`TcpProxy.restore`; new ones work again.
"""

from __future__ import annotations

import contextlib
import socket
import threading

from sfxflow.benchmarks.localhost import free_port

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``target_port``; :meth:`cut` and :meth:`restore` it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        #: connections of an older generation than this forward nothing any more
        self._generation = 0
        self._holed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()/stop()
                return
            if self._holed:  # accepted, then never answered (closed by cut()/stop() only)
                with self._lock:
                    self._conns.append(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut while this one was being accepted
                    client.close()
                    upstream.close()
                    continue
                self._conns += [client, upstream]
                generation = self._generation
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b, generation), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, generation: int) -> None:
        try:
            while data := src.recv(1 << 16):
                if generation == self._generation:  # else: dropped silently
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and break the open ones."""
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
        if self._thread is not None:
            self._thread.join(timeout=5)

    def blackhole(self) -> None:
        """Drop everything silently: open connections stop forwarding without being closed, new
        ones are accepted and never answered."""
        with self._lock:
            self._holed = True
            self._generation += 1

    def restore(self) -> None:
        """Forward again (new connections): after :meth:`cut` or :meth:`blackhole`."""
        with self._lock:
            self._holed = False
        if self._listener is None:
            self.start()

    def stop(self) -> None:
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
