"""Inspection records: every ``/inspect`` answer kept, reviewable and summarised.

* :mod:`service.records.recorder` - :class:`Recorder`: turns answers into rows and writes them
  in batches off the request path (bounded buffer, retries, metrics and a log of what it lost)
* :mod:`service.records.media` - :class:`MediaStore`: kept thumbnails / heatmaps / originals on
  disk, with a size cap and an age limit
* :mod:`service.records.queries` - filters, keyset pagination, reviews, CSV rows
* :mod:`service.records.stats` - per-product statistics from score histograms, drift
* :mod:`service.records.drift` - :class:`DriftMonitor`: drift gauges on ``/metrics``
* :mod:`service.records.client_fields` - validation of the client's ``part_id`` / ``station``
* :mod:`service.records.schemas` - JSON models of the records API
"""
