"""Worker side: few-shot references loaded from the database, cached by version.

A job names the reference version the API saw (:class:`service.queue.base.ProductRef`); the
cache serves that version or a newer one and reloads from the database otherwise, so a product
changed through any API process is used by every worker as soon as a job asks for it. Banks
that do not fit the worker's detector (another backbone, detector, image size, layers or
prompt checkpoint) are refused with :class:`ReferenceMismatchError`, never used silently.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from model.detector import DetectorIdentity, FewShotReference
from model.fewshot import ReferenceBank

from service.db.database import Database
from service.products import repository
from service.queue.base import ProductRef


class ReferenceMissing(LookupError):
    """The job asks for a reference the database no longer has (product deleted or rebuilt
    without photos)."""


@dataclass
class _Cached:
    version: int
    bank: ReferenceBank


class ReferenceStore:
    """LRU cache of decoded banks by product id, bounded in bytes (thread-safe; used from the
    detector thread). The most recently used bank always stays, whatever its size."""

    def __init__(self, database: Database, identity: DetectorIdentity, max_bytes: int = 512 * 2**20) -> None:
        self.database = database
        self.identity = identity
        self.max_bytes = max_bytes
        self._cache: OrderedDict[int, _Cached] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def reference_for(self, product: ProductRef) -> tuple[FewShotReference, int] | None:
        """The reference an inspect job asks for and its version (``None``: zero-shot only).

        Raises:
            ReferenceMissing: the asked-for reference is gone.
            model.fewshot.ReferenceMismatchError: the bank was built for another detector.
        """
        if product.reference_version <= 0:
            return None
        with self._lock:
            cached = self._cache.get(product.id)
            if cached is not None and cached.version >= product.reference_version:
                self._cache.move_to_end(product.id)
                return FewShotReference(cached.bank, product.fusion_weight), cached.version
        row = self.database.transaction(lambda session: _load(session, product.id))
        if row is None or row[0] < product.reference_version:
            raise ReferenceMissing(
                f"product {product.name!r} has no reference version {product.reference_version} any more "
                "(deleted or recalibrated without photos)"
            )
        version, data = row
        bank = ReferenceBank.from_bytes(data)
        bank.check_compatible(self.identity)
        with self._lock:
            self.loads += 1
            self._cache[product.id] = _Cached(version, bank)
            self._cache.move_to_end(product.id)
            while len(self._cache) > 1 and sum(c.bank.nbytes for c in self._cache.values()) > self.max_bytes:
                self._cache.popitem(last=False)
        return FewShotReference(bank, product.fusion_weight), version


def _load(session, product_id: int) -> tuple[int, bytes] | None:  # type: ignore[no-untyped-def]
    reference = repository.reference_of(session, product_id)
    return (reference.version, bytes(reference.bank)) if reference is not None else None
