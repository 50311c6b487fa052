"""The framed channel (``shardc._channel``): frames of every size, alone and mixed, with and
without file descriptors, cut by the kernel at any byte; a big frame received in place; EOF
and timeouts in the middle of a frame."""

from __future__ import annotations

import os
import random
import select
import socket
import threading
from typing import Any

import pytest

from shardc import _channel
from shardc._channel import BIG_FRAME, Channel, ChannelClosed

pytestmark = pytest.mark.timeout(60)


def _pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel(a), Channel(b)


def _frame(msg: Any) -> bytes:
    """The bytes a Channel writes for ``msg`` (no fds), without sending them."""
    ch = Channel(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    ch.cork()
    ch.send(msg)
    data = b"".join(d for d, _ in ch._corked or [])
    ch._corked = None
    ch.close()
    return data


def _drain(ch: Channel, count: int) -> list[tuple[Any, list[int]]]:
    got: list[tuple[Any, list[int]]] = []
    while len(got) < count:
        assert select.select([ch.sock], [], [], 20)[0], f"stalled after {len(got)} of {count} messages"
        got += ch.recv_ready()
    return got


def _payloads(seed: int, count: int) -> list[Any]:
    rng = random.Random(seed)
    out: list[Any] = []
    for i in range(count):
        size = rng.choice([0, 1, 100, 60_000, BIG_FRAME - 40, BIG_FRAME + 1, 300_000, 3 << 20])
        out.append(("m", i, rng.randbytes(size)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_frames_arrive_whole_and_in_order(seed: int) -> None:
    """Small and big frames back to back (sent from another thread, so reads cut them
    anywhere): each arrives whole, in order, and a big one does not swallow the next."""
    tx, rx = _pair()
    msgs = _payloads(seed, 60)
    t = threading.Thread(target=lambda: [tx.send(m) for m in msgs])
    t.start()
    got = _drain(rx, len(msgs))
    t.join()
    assert [m for m, _ in got] == msgs and all(f == [] for _, f in got)
    tx.close()
    rx.close()


def test_frames_written_one_byte_at_a_time() -> None:
    """The worst cut: every read returns one byte (a big frame's header alone, then its payload)."""
    a, b = socket.socketpair()
    rx = Channel(b)
    msgs = [("small", 1), ("big", b"x" * (BIG_FRAME + 5000)), ("after", 2)]
    data = b"".join(_frame(m) for m in msgs)
    got: list[Any] = []
    for i in range(0, len(data), 4096):  # (one byte each for the first frames, then 4 KiB steps)
        chunk = data[i : i + 4096]
        if i < 4096:
            for k in range(len(chunk)):
                a.sendall(chunk[k : k + 1])
                got += [m for m, _ in rx.poll_nonblocking()]
        else:
            a.sendall(chunk)
            got += [m for m, _ in rx.poll_nonblocking()]
    got += [m for m, _ in rx.poll_nonblocking()]
    assert got == msgs
    a.close()
    rx.close()


def test_fds_go_with_their_frame_small_and_big() -> None:
    """Each frame gets exactly the fds it was sent with, big frames included."""
    tx, rx = _pair()
    pipes = [os.pipe() for _ in range(4)]
    try:
        msgs = [("a", b"1"), ("b", b"x" * (2 << 20)), ("c", b"2"), ("d", b"y" * (BIG_FRAME + 1))]
        t = threading.Thread(target=lambda: [tx.send(m, [p[0]]) for m, p in zip(msgs, pipes, strict=True)])
        t.start()
        got = _drain(rx, 4)
        t.join()
        assert [m for m, _ in got] == msgs
        for (_m, fds), (_r, w) in zip(got, pipes, strict=True):
            assert len(fds) == 1
            os.write(w, b"!")
            assert os.read(fds[0], 1) == b"!"  # the same pipe
            os.close(fds[0])
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)
        tx.close()
        rx.close()


def test_eof_in_the_middle_of_a_big_frame_is_channel_closed() -> None:
    a, b = socket.socketpair()
    rx = Channel(b)
    frame = _frame(("big", b"z" * (1 << 20)))

    def half_then_close() -> None:
        a.sendall(frame[: len(frame) // 2])
        a.close()

    t = threading.Thread(target=half_then_close)
    t.start()
    with pytest.raises(ChannelClosed):
        while True:
            assert select.select([b], [], [], 10)[0]
            assert rx.recv_ready() == []
    t.join()
    rx.close()


def test_a_timeout_in_the_middle_of_a_big_frame_keeps_what_was_read() -> None:
    """recv with a socket timeout: the half frame stays; the rest completes it."""
    a, b = socket.socketpair()
    rx = Channel(b)
    msg = ("big", os.urandom(1 << 20))
    frame = _frame(msg)
    first = threading.Thread(target=a.sendall, args=(frame[:300_000],))
    first.start()
    b.settimeout(0.5)
    with pytest.raises(TimeoutError):
        while True:
            rx.recv()  # (reads what the first part brings, then times out waiting for the rest)
    first.join()
    assert rx._big_need and rx._big_at == 300_000 - 12  # the header's 12 bytes are not payload
    rest = threading.Thread(target=a.sendall, args=(frame[300_000:],))
    rest.start()
    b.settimeout(10)
    assert rx.recv()[0] == msg
    rest.join()
    a.close()
    rx.close()


def test_the_big_buffer_is_kept_only_up_to_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_channel, "KEEP_BIG", 1 << 20)
    tx, rx = _pair()
    for size, kept in ((600_000, True), (3 << 20, False), (700_000, True)):
        t = threading.Thread(target=tx.send, args=(b"q" * size,))
        t.start()
        assert _drain(rx, 1)[0][0] == b"q" * size
        t.join()
        assert (len(rx._big) > 0) == kept, (size, len(rx._big))
    tx.close()
    rx.close()
