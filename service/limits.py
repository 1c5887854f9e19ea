"""Process-wide memory budget for decoded images, held per request.

A count of requests in flight does not bound memory: one 100-byte PNG whose header says
7000 x 7000 decodes to 147 MB and costs about 1 GB by the time the model and the heatmap ran.
So every upload reserves its decoded size (width x height x bands x bytes per sample, read from
the header before decoding, :func:`service.image_input.decode_image`) in a :class:`ByteBudget`
and holds it until its request is over (response sent or client gone); an upload that does not
fit answers 503 ``overloaded`` at once instead of decoding.

Reservations are tied to the request through :class:`RequestLeases` in the ASGI scope, released
by the upload guard (:mod:`service.upload_guard`) when the app returns for that request, whatever
route decoded the image and however the request ended.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, MutableMapping
from typing import Any

from service.image_input import ImageRejected

LEASES_SCOPE_KEY = "genclip.leases"


class Lease:
    """Bytes held in a :class:`ByteBudget`; :meth:`release` is idempotent."""

    def __init__(self, budget: ByteBudget, nbytes: int) -> None:
        self.budget = budget
        self.nbytes = nbytes
        self._released = False

    def release(self) -> None:
        with self.budget._lock:
            if self._released:
                return
            self._released = True
            self.budget._used -= self.nbytes


class ByteBudget:
    """A byte count shared by all requests of one process (thread-safe: decoding runs in threads)."""

    def __init__(self, capacity: int, *, retry_after_ms: int = 1000) -> None:
        self.capacity = capacity
        self.retry_after_ms = retry_after_ms
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    def try_reserve(self, nbytes: int) -> Lease | None:
        """A lease on ``nbytes``, or ``None`` when they do not fit now."""
        with self._lock:
            if self._used + nbytes > self.capacity:
                return None
            self._used += nbytes
        return Lease(self, nbytes)

    def reserver(self, scope: MutableMapping[str, Any]) -> Callable[[int], None]:
        """``reserve(nbytes)`` for :func:`~service.image_input.decode_image`: holds the bytes until
        the request of ``scope`` is over, or raises :class:`ImageRejected` 503 ``overloaded``."""
        return self.reserver_for(request_leases(scope))

    def reserver_for(self, leases: RequestLeases) -> Callable[[int], None]:
        """As :meth:`reserver`, holding the bytes until ``leases`` is closed (an image needed
        only for a moment, e.g. a good photo decoded to be validated, then dropped)."""

        def reserve(nbytes: int) -> None:
            lease = self.try_reserve(nbytes)
            if lease is None:
                raise ImageRejected(
                    503, "overloaded",
                    f"decoded-image memory budget spent: {self._used} of {self.capacity} bytes held by "
                    f"requests in progress, this image needs {nbytes}",
                    retry_after_ms=self.retry_after_ms,
                )
            leases.add(lease)

        return reserve


class RequestLeases:
    """The leases of one request; once :meth:`close` d, a late :meth:`add` releases at once
    (a decode thread that finishes after its client went away must not leak its bytes)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leases: list[Lease] = []
        self._closed = False

    def add(self, lease: Lease) -> None:
        with self._lock:
            if not self._closed:
                self._leases.append(lease)
                return
        lease.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            leases, self._leases = self._leases, []
        for lease in leases:
            lease.release()


def request_leases(scope: MutableMapping[str, Any]) -> RequestLeases:
    """The request's :class:`RequestLeases` (created on first use)."""
    leases = scope.get(LEASES_SCOPE_KEY)
    if leases is None:
        leases = scope[LEASES_SCOPE_KEY] = RequestLeases()
    return leases


def release_request(scope: MutableMapping[str, Any]) -> None:
    """Release everything the request held (called when the app returned for it)."""
    leases = scope.get(LEASES_SCOPE_KEY)
    if leases is not None:
        leases.close()
    else:  # a lease taken later (a decode thread outliving its request) is released at once
        closed = RequestLeases()
        closed.close()
        scope[LEASES_SCOPE_KEY] = closed
