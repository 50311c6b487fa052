"""Framed messages (+ file descriptors) over a unix stream socket.

Master and worker talk over one ``socketpair`` per worker.  A frame is a
12-byte little-endian header (payload length, number of file descriptors)
and a pickle.  File descriptors (segments new to the worker) travel with the
frame's first byte via ``SCM_RIGHTS``; the kernel may deliver them together
with the tail of the previous frame in one read, so the receiver keeps them
in a FIFO and gives each frame exactly the count its header announces.  The
socket doubles as a lifeline: EOF means the other side died.

All waiting is done by the caller (selectors with deadlines); ``recv`` here
never blocks longer than the socket's own timeout.
"""

from __future__ import annotations

import array
import os
import pickle
import select
import socket
import struct
from collections import deque
from typing import Any

from .errors import ShardcError

_HDR = struct.Struct("<QI")
_MAX_FDS = 64
_ANC_SPACE = socket.CMSG_SPACE(_MAX_FDS * 4)


READ_SMALL, READ_BIG = 1 << 16, 1 << 20  # bytes per recvmsg (see Channel._fill)
# A frame with a payload over BIG_FRAME is received straight into a buffer of its size (one copy,
# from the kernel); that buffer is kept for the next big frame up to KEEP_BIG bytes.
BIG_FRAME, KEEP_BIG = 1 << 17, 64 << 20
SMALL_FRAME = 4096  # a complete frame up to this size is unpickled from a copy, bigger ones from a view


class ChannelClosed(ShardcError, EOFError):
    """The peer closed its end (or died)."""


class Channel:
    """One end of a master<->worker connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()  # bytes read and not yet parsed (small frames)
        self._rbuf = memoryview(bytearray(READ_SMALL))  # what each read lands in (kept: no allocation per read)
        self._big = bytearray()  # a big frame's payload, received in place (see _fill)
        self._big_need = self._big_at = self._big_fds = 0  # its size, bytes in, fds announced
        self._fds: list[int] = []
        self._ready: deque[tuple[Any, list[int]]] = deque()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self._corked: list[tuple[bytes, list[int]]] | None = None  # see cork

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- sending -------------------------------------------------------------
    def send(self, obj: Any, fds: list[int] | tuple[int, ...] = ()) -> int:
        """Send one message; returns its size in bytes."""
        payload = pickle.dumps(obj, protocol=5)
        return self.send_bytes(payload, fds)

    def cork(self) -> None:
        """Hold what is sent from now on until :meth:`uncork`, which sends it
        all with one system call: a call's setup and its first work reach a
        sleeping worker in one wake-up."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        """Send what :meth:`cork` held (raises OSError like a send)."""
        held, self._corked = self._corked, None
        if not held:
            return
        fds = [fd for _data, f in held for fd in f]
        if len(fds) > _MAX_FDS:  # more than one sendmsg carries: frame by frame
            for data, f in held:
                self._send_frame(data, f)
            return
        # A frame's fds may arrive before the frame (the receiver queues them
        # in order and gives each frame the count its header names).
        self._send_frame(b"".join(data for data, _f in held), fds)

    def send_many(self, objs: list[Any]) -> int:
        """Send several messages with one system call; returns bytes sent."""
        frames = []
        for obj in objs:
            payload = pickle.dumps(obj, protocol=5)
            frames.append(_HDR.pack(len(payload), 0))
            frames.append(payload)
        data = b"".join(frames)
        if self._corked is not None:
            self._corked.append((data, []))
        else:
            self.sock.sendall(data)
        self.bytes_sent += len(data)
        self.messages_sent += len(objs)
        return len(data)

    def send_bytes(self, payload: bytes, fds: list[int] | tuple[int, ...] = ()) -> int:
        frame = _HDR.pack(len(payload), len(fds)) + payload
        if self._corked is not None:
            self._corked.append((frame, list(fds)))
        else:
            self._send_frame(frame, fds)
        self.bytes_sent += len(frame)
        self.messages_sent += 1
        return len(frame)

    def _send_frame(self, frame: bytes, fds: list[int] | tuple[int, ...]) -> None:
        view = memoryview(frame)
        if fds:
            fds = list(fds)
            # Send the fds in groups of at most _MAX_FDS, each with >= 1 byte.
            while fds:
                group, fds = fds[:_MAX_FDS], fds[_MAX_FDS:]
                n = socket.send_fds(self.sock, [view[:1] if fds else view], group)
                view = view[n:]
        if len(view):
            self.sock.sendall(view)

    # -- receiving -------------------------------------------------------------
    def _fill(self, flags: int = 0) -> bool:
        """Read what is available (blocking per the socket's timeout, unless
        ``flags`` has MSG_DONTWAIT).

        Returns False on EOF.

        Reads land in buffers allocated once, not in a fresh ``bytes`` per
        ``recvmsg`` (1 MiB each time cost ~15 us of mmap and page faults, most
        of a 10 MB transfer's receiving time).  While a big frame is open (its
        header read, :meth:`_parse`), its payload is read straight into place.
        """
        if self._big_need:
            with memoryview(self._big) as mv, mv[self._big_at : self._big_need] as view:
                n, anc, _flags, _addr = self.sock.recvmsg_into([view], _ANC_SPACE, flags)
        else:
            n, anc, _flags, _addr = self.sock.recvmsg_into([self._rbuf], _ANC_SPACE, flags)
            if n:
                self._buf += self._rbuf[:n]
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
                self._fds.extend(fds)
        if not n:
            return False
        if self._big_need:
            self._big_at += n
        elif n == len(self._rbuf) and n < READ_BIG:  # reads fill it: many frames in transit
            self._rbuf = memoryview(bytearray(READ_BIG))
        self.bytes_received += n
        return True

    def _parse(self) -> None:
        while True:
            if self._big_need:
                if self._big_at < self._big_need:
                    return
                n, nfds = self._big_need, self._big_fds
                self._big_need = 0
                with memoryview(self._big) as mv, mv[:n] as payload:
                    self._take(payload, nfds)
                if len(self._big) > KEEP_BIG:
                    self._big = bytearray()
                continue
            if len(self._buf) < _HDR.size:
                return
            n, nfds = _HDR.unpack_from(self._buf)
            end = _HDR.size + n
            if len(self._buf) >= end:
                if n <= SMALL_FRAME:  # a copy costs less than a view's setup here
                    self._take(self._buf[_HDR.size : end], nfds)
                else:
                    with memoryview(self._buf) as mv, mv[_HDR.size : end] as payload:
                        self._take(payload, nfds)
                del self._buf[:end]
                continue
            if n <= BIG_FRAME:
                return
            # A big frame: the rest of its payload goes straight into a buffer of its size.
            if len(self._big) < n:
                self._big = bytearray(n)
            have = len(self._buf) - _HDR.size
            self._big[:have] = self._buf[_HDR.size :]
            self._big_need, self._big_at, self._big_fds = n, have, nfds
            self._buf.clear()

    def _take(self, payload: Any, nfds: int) -> None:
        """Unpickle one frame's payload (bytes-like; nothing of it is kept)."""
        if not nfds:
            self._ready.append((pickle.loads(payload), []))
            return
        if len(self._fds) < nfds:  # cannot happen: fds arrive with the frame's first byte
            raise ChannelClosed(f"frame announced {nfds} fds but only {len(self._fds)} arrived")
        fds, self._fds = self._fds[:nfds], self._fds[nfds:]
        self._ready.append((pickle.loads(payload), fds))

    def recv(self) -> tuple[Any, list[int]]:
        """Block until one message is complete; returns ``(obj, fds)``.

        Raises:
            ChannelClosed: on EOF.
        """
        while not self._ready:
            if not self._fill():
                raise ChannelClosed("peer closed the channel")
            self._parse()
        return self._ready.popleft()

    def recv_ready(self) -> list[tuple[Any, list[int]]]:
        """Read once (the socket is readable) and return every complete message.

        Raises:
            ChannelClosed: on EOF with nothing left to return.
        """
        alive = self._fill()
        self._parse()
        out = list(self._ready)
        self._ready.clear()
        if not alive and not out:
            raise ChannelClosed("peer closed the channel")
        return out

    def pending(self) -> bool:
        return bool(self._ready)

    def wait(self, timeout: float) -> bool:
        """True if a message is ready, or bytes arrive within ``timeout`` seconds."""
        return bool(self._ready) or bool(select.select([self.sock], [], [], timeout)[0])

    def poll_nonblocking(self) -> list[tuple[Any, list[int]]]:
        """Return messages already available without blocking."""
        while True:
            try:
                if not self._fill(socket.MSG_DONTWAIT):
                    break
            except BlockingIOError:
                break
        self._parse()
        out = list(self._ready)
        self._ready.clear()
        return out

    def close(self) -> None:
        """Close the socket and every received fd nobody took: those of a frame
        cut short by the peer's death and of messages never read (each may pin
        a segment, e.g. a big return value, ``shardc.values``)."""
        try:
            self.sock.close()
        except OSError:
            pass
        left = self._fds + [fd for _msg, fds in self._ready for fd in fds]
        self._fds, self._ready = [], deque()
        for fd in left:
            try:
                os.close(fd)
            except OSError:
                pass
