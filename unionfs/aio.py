"""The single bridge from synchronous code (the CLI, FUSE worker threads) to asyncio:
one event loop in one long-lived thread, so HTTP sessions and connections are shared."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class EventLoopThread:
    """Runs coroutines on a private event loop thread. Use as a context manager."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="crfs-merge-io", daemon=True)

    def __enter__(self) -> EventLoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Returns the coroutine's result, raising what it raised; waits at most `timeout`."""
        return self.submit(coroutine).result(timeout)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Starts the coroutine on the loop; returns a future of its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)
