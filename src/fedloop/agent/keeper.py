"""`LocalKeeper`: writes the local model being uploaded to disk once its upload has taken a while.

An upload answered quickly needs no copy on disk; one still in flight after ``after`` seconds
gets its model and the `sending` phase written (by a watcher thread, while the upload goes on),
so that a restart resumes the upload from the file.

The watcher is not told about each upload. While none is waiting it looks at the slot every
``after`` seconds (at least 20 ms apart), so it sees an upload before the upload is due, and
then waits for that moment. On the 2-core VM of docs/performance.md, handing each round's
upload to a thread and waking it again with the answer cost 0.17–0.19 ms of the agent's CPU
a round (three thread wake-ups, each with the GIL changing hands); setting the shared slot
costs an uncontended lock. A slow upload's model is written ``after`` seconds after it
started (up to 20 ms later for a shorter ``after``). With ``after = 0`` the watcher is woken
for each upload, and every model is written, even one answered before the watcher got to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedloop.agent.client import ModelBody
from fedloop.agent.state import AgentState

log = logging.getLogger("fedloop.agent")

Save = Callable[[ModelBody, dict[str, Any], AgentState], None]


@dataclass
class _Job:
    due: float  # time.monotonic() at which the model is written if still unanswered
    data: ModelBody
    meta: dict[str, Any]
    state: AgentState  # the `sending` state written after the model


class LocalKeeper:
    """Writes the local model of an upload not answered within ``after`` seconds with `save`,
    on a watcher thread (0: every one, at once, while the upload starts)."""

    def __init__(self, after: float, save: Save) -> None:
        self.after = after
        # How often an idle watcher looks; with no delay it is woken by start() instead.
        self.every: float | None = max(after, 0.02) if after > 0 else None
        self._save = save
        self._cv = threading.Condition()
        self._job: _Job | None = None  # waiting for its time, or for its answer
        self._saving = False  # the watcher is writing one
        self._error: BaseException | None = None  # from the watcher's last write
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self, data: ModelBody, meta: dict[str, Any], state: AgentState) -> None:
        """The upload of `data` starts now: keep it unless answered() comes in time."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the keeper is closed")
            self._job = _Job(time.monotonic() + self.after, data, meta, state)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._watch, name="fedloop-agent-save", daemon=True
                )
                self._thread.start()
            elif self.after <= 0:
                self._cv.notify()  # written at once: only then is the watcher woken

    def answered(self) -> None:
        """The upload was answered (or refused): its model need not be written any more,
        unless ``after`` is 0: then it is written in any case, by the watcher or by finish(),
        even when the answer came before the watcher got to it."""
        with self._cv:
            if self.after > 0:
                self._job = None

    def finish(self) -> None:
        """Return once no write is left: wait for the watcher's, write an unanswered upload's
        model now on this thread, and raise the error of a write that failed."""
        with self._cv:
            while self._saving:
                self._cv.wait()
            job, self._job = self._job, None
            error, self._error = self._error, None
        if error is not None:
            raise error
        if job is not None:
            self._save(job.data, job.meta, job.state)

    def close(self) -> None:
        """Stop the watcher, after writing what it must (an error is logged, not raised)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.finish()
        except Exception:
            log.exception("the local model could not be written for a restart")

    def _watch(self) -> None:
        with self._cv:
            while not self._closed:
                job = self._job
                if job is None:
                    self._cv.wait(self.every)
                    continue
                early = job.due - time.monotonic()
                if early > 0:
                    self._cv.wait(early)  # answered meanwhile: found gone when it wakes
                    continue
                self._job, self._saving = None, True
                error: BaseException | None = None
                self._cv.release()
                try:
                    self._save(job.data, job.meta, job.state)
                except BaseException as exc:  # handed to finish(), on the agent's thread
                    error = exc
                finally:
                    self._cv.acquire()
                self._error, self._saving = error, False
                self._cv.notify_all()
