"""modules.fifo_lock.FIFOLock: a non-reentrant lock handed to waiters in arrival order."""
import collections
import threading


class FIFOLock:
    def __init__(self):
        self._lock = threading.Lock()
        self._guard = threading.Lock()
        self._waiters = collections.deque()

    def acquire(self, blocking=True):
        with self._guard:
            if self._lock.acquire(False):
                return True
            if not blocking:
                return False
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()
        return self._lock.acquire()

    def release(self):
        with self._guard:
            if self._waiters:
                self._waiters.popleft().set()
            self._lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
