"""The single bridge from synchronous code (the CLI, FUSE worker threads) to asyncio:
one event loop in one long-lived thread, so HTTP sessions and connections are shared."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
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
        self.cancel_pending()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Returns the coroutine's result, raising what it raised. After `timeout` seconds it
        stops waiting, cancels the coroutine (which may clean up on the loop meanwhile) and
        raises TimeoutError: a caller never waits longer, and nothing it abandoned runs on."""
        return self.wait(self.submit(coroutine), timeout)

    def wait(self, future: Future[T], timeout: float | None = None) -> T:
        """Returns the result of `future` (from submit), as `run` does: after `timeout` seconds
        it cancels what the future runs and raises TimeoutError."""
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if not future.cancel() and future.done():
                return future.result()  # it finished just now
            raise TimeoutError(f"no result within {timeout:.1f}s") from None

    def cancel_pending(self, seconds: float = 5.0) -> None:
        """Cancels whatever still runs on the loop (a lazy layer's read-ahead, when a command
        closes the image) and waits for it to unwind, so that nothing is destroyed pending."""
        if self._thread.is_alive() and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self.run(_cancel_others(), seconds)

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Starts the coroutine on the loop; returns a future of its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)


async def _cancel_others() -> None:
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
