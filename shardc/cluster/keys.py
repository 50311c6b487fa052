"""Content keys of a cluster call's inputs, and which keys a session keeps (see :mod:`.session`)."""

from __future__ import annotations

import hashlib
import os
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

_CHUNK = 32 << 20  # bytes hashed per task: big inputs hash on several cores (hashlib drops the GIL)


SEALED_MIN_BYTES = 1 << 20  # plain arrays from this size go through the share cache's sealed copy
_sealed_keys: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def is_sealed(shared: Any) -> bool:
    """Whether a :class:`~shardc.share.Shared` array's bytes can no longer change
    (sealed memfd segments: the kernel refuses writable mappings)."""
    return bool(shared.segments) and all(seg.sealed for seg in shared.segments)


def content_key(data: np.ndarray, sealed: Any = None) -> str:
    """The content identity of ``data`` (flat bytes): SHA-256 of the bytes and their count.

    ``sealed``: the sealed :class:`~shardc.share.Shared` copy that ``data`` views;
    its bytes cannot change, so its key is hashed once and remembered.
    """
    if sealed is not None:
        key = _sealed_keys.get(sealed)
        if key is None:
            key = _sealed_keys[sealed] = content_key(data)
        return key
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
    n = raw.nbytes
    if n <= 2 * _CHUNK:
        return f"{hashlib.sha256(raw).hexdigest()[:40]}-{n}"
    parts = [raw[i : i + _CHUNK] for i in range(0, n, _CHUNK)]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as ex:
        digests = list(ex.map(lambda p: hashlib.sha256(p).digest(), parts))
    return f"{hashlib.sha256(b''.join(digests)).hexdigest()[:40]}-{n}"


class InputCache:
    """Content keys the session holds on the nodes, least recently used first."""

    def __init__(self) -> None:
        self.sizes: OrderedDict[str, int] = OrderedDict()

    def use(self, keys: dict[str, int], budget: int) -> tuple[list[str], list[str]]:
        """A call needs ``keys`` (key -> bytes): (keys new to the session, keys to drop).

        The call's keys are all kept; older ones while they fit in ``budget``.
        """
        new = [k for k in keys if k not in self.sizes]
        for k, n in keys.items():
            self.sizes[k] = n
            self.sizes.move_to_end(k)
        drop = []
        older = sum(n for k, n in self.sizes.items() if k not in keys)
        for k in list(self.sizes):
            if older <= budget:
                break
            if k not in keys:
                older -= self.sizes.pop(k)
                drop.append(k)
        return new, drop
