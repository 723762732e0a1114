"""One helper for the tests that run the same object from several threads at once."""
from __future__ import annotations

import threading
from typing import Callable


def run_in_threads(work: Callable[[int], None], count: int = 4) -> list[BaseException]:
    """Run `work(i)` for i in range(count), each in its own thread, released together; the errors they raised."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as error:  # noqa: BLE001 - handed to the caller, which asserts on it
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors
