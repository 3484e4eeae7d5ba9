"""Shared pieces of the lens tests (tests/test_lens*.py): the W2 prompt and the one-thread fixture."""

from __future__ import annotations

import pytest

PROMPT = "Today it is Monday so tomorrow it is"


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread, as the lens CLI uses: on a busy 2-core machine two threads made
    these tests ~10x slower (threads waiting for each other at every small op). Autouse in
    every module that imports it."""
    from replab.threads import limit_threads

    with limit_threads(1):
        yield
