"""Fixtures of the tables tests: a 2-worker pool (frame builders: _frames.py)."""

from __future__ import annotations

import pytest

import shardc

pa = pytest.importorskip("pyarrow")
pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def pool2():
    p = shardc.Pool(2)
    yield p
    p.close()
