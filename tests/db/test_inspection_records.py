"""Inspection records in the database (SQLite and PostgreSQL): keyset pages stable under
concurrent inserts, filters, idempotent batch inserts, reviews, statistics and drift."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from service.db.database import open_database
from service.db.inspections import SCORE_BINS, InspectionRecord
from service.db.products import Product
from service.records import queries
from service.records.queries import InspectionFilter
from service.records.recorder import insert_rows
from service.records.stats import drift_last_24h, product_stats, quantile

from record_rows import make_row  # tests/record_rows.py

T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


@pytest.fixture
def db(database_url):
    database = open_database(database_url, migrate=True)
    yield database
    database.close()


def test_keyset_pages_never_skip_nor_repeat_under_concurrent_inserts(db) -> None:
    """Read page after page while another thread inserts new answers and late (retried) old ones."""
    rng = np.random.default_rng(0)
    existing = [make_row(T0 + timedelta(seconds=int(s))) for s in rng.integers(0, 3600, 400)]  # equal times too
    db.transaction(lambda s: insert_rows(s, existing))
    stop = threading.Event()
    inserted: list[str] = []

    def writer() -> None:
        k = 0
        while not stop.is_set():
            # a new answer (newest) and a record written late, landing among the old ones
            batch = [make_row(T0 + timedelta(hours=2, seconds=k)), make_row(T0 + timedelta(seconds=int(rng.integers(0, 3600))))]
            db.transaction(lambda s, b=batch: insert_rows(s, b))
            inserted.extend(r["id"] for r in batch)
            k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen: list[InspectionRecord] = []
        cursor = None
        pages = 0
        while True:
            rows, cursor = db.transaction(lambda s, c=cursor: queries.list_page(s, InspectionFilter(), 17, c))
            seen.extend(rows)
            pages += 1
            if cursor is None:
                break
    finally:
        stop.set()
        thread.join()
    ids = [r.id for r in seen]
    assert len(ids) == len(set(ids)), "a row was repeated"
    assert {r["id"] for r in existing} <= set(ids), "a row that existed before the first page was skipped"
    keys = [(r.created_at, r.seq) for r in seen]
    assert keys == sorted(keys, reverse=True), "pages are not in (created_at, seq) order"
    assert pages >= 400 // 17 and inserted, "the writer did not run while paging"


def test_filters(db) -> None:
    rows = [
        make_row(T0, 0.1, product="bottle", station="s1", part_id="A1"),
        make_row(T0 + timedelta(minutes=1), 0.7, product="bottle", station="s2", part_id="A2"),
        make_row(T0 + timedelta(minutes=2), 0.55, product="screw", station="s1"),
        make_row(T0 + timedelta(minutes=3), 0.2, product=None, station=None),
    ]
    db.transaction(lambda s: insert_rows(s, rows))
    db.transaction(lambda s: queries.add_review(s, rows[1]["id"], "good", "dust", "ann"))

    def ids(**kw) -> set[str]:
        found, _ = db.transaction(lambda s: queries.list_page(s, InspectionFilter(**kw), 100))
        return {r.id for r in found}

    every = {r["id"] for r in rows}
    assert ids() == every
    assert ids(product="bottle") == {rows[0]["id"], rows[1]["id"]}
    assert ids(station="s1") == {rows[0]["id"], rows[2]["id"]}
    assert ids(part_id="A2") == {rows[1]["id"]}
    assert ids(decision="anomalous") == {rows[1]["id"], rows[2]["id"]}
    assert ids(decision="good") == {rows[0]["id"], rows[3]["id"]}
    assert ids(min_score=0.2, max_score=0.6) == {rows[2]["id"], rows[3]["id"]}
    assert ids(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == {rows[1]["id"], rows[2]["id"]}
    assert ids(reviewed=True) == {rows[1]["id"]}
    assert ids(reviewed=False) == every - {rows[1]["id"]}
    assert ids(verdict="good") == {rows[1]["id"]} and ids(verdict="defect") == set()
    assert ids(product="bottle", decision="good", station="s1") == {rows[0]["id"]}


def test_retried_batch_is_written_once_and_reviews_keep_history(db) -> None:
    rows = [make_row(T0 + timedelta(seconds=i)) for i in range(5)]
    db.transaction(lambda s: insert_rows(s, rows))
    db.transaction(lambda s: insert_rows(s, rows + [make_row(T0)]))  # commit answer lost, batch retried
    found, _ = db.transaction(lambda s: queries.list_page(s, InspectionFilter(), 100))
    assert len(found) == 6

    record_id = rows[0]["id"]
    db.transaction(lambda s: queries.add_review(s, record_id, "defect", "crack", "ann"))
    record, history = db.transaction(lambda s: queries.add_review(s, record_id, "good", "was dust", "bob"))
    assert (record.review_verdict, record.reviewer, record.review_note) == ("good", "bob", "was dust")
    assert [(r.verdict, r.reviewer) for r in history] == [("defect", "ann"), ("good", "bob")]
    assert db.transaction(lambda s: queries.add_review(s, "nope", "good", None, None)) is None


def test_cursor_round_trip_and_refusal() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert queries.decode_cursor(queries.encode_cursor(when, 42)) == (when, 42)
    for bad in ("", "!!!", "bm90IGEgY3Vyc29y", queries.encode_cursor(when, 1)[:-3] + "AAA"):
        with pytest.raises(queries.CursorError):
            queries.decode_cursor(bad)


def test_quantiles_from_bins_match_numpy() -> None:
    rng = np.random.default_rng(1)
    scores = np.clip(rng.beta(2, 5, 5000), 0, 1)
    counts = np.bincount(np.minimum((scores * SCORE_BINS).astype(int), SCORE_BINS - 1), minlength=SCORE_BINS)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert quantile(counts, q) == pytest.approx(np.quantile(scores, q), abs=1.5 / SCORE_BINS)
    assert quantile(np.zeros(SCORE_BINS, dtype=np.int64), 0.5) is None
    one = np.zeros(SCORE_BINS, dtype=np.int64)
    one[700] = 1
    assert 0.7 <= quantile(one, 0.5) <= 0.701


def test_product_stats_counts_reviews_quantiles_and_drift(db) -> None:
    now = T0 + timedelta(days=2, hours=12)
    rng = np.random.default_rng(2)
    day1 = [make_row(T0 + timedelta(minutes=i), float(s)) for i, s in enumerate(rng.uniform(0.1, 0.3, 40))]
    day1 += [make_row(T0 + timedelta(minutes=100 + i), 0.8) for i in range(5)]
    # day 3 (the last 24 h): good parts now score about 0.42 - drifted from the calibration's 0.2
    day3 = [make_row(now - timedelta(hours=1, minutes=i), float(s)) for i, s in enumerate(rng.uniform(0.4, 0.44, 30))]
    other = [make_row(T0, 0.9, product="screw")]
    db.transaction(lambda s: insert_rows(s, day1 + day3 + other))
    db.transaction(lambda s: queries.add_review(s, day1[-1]["id"], "good", None, None))  # false alarm
    db.transaction(lambda s: queries.add_review(s, day1[-2]["id"], "defect", None, None))  # confirmed
    db.transaction(lambda s: queries.add_review(s, day1[0]["id"], "defect", None, None))  # missed defect
    db.transaction(lambda s: s.add(Product(name="bottle", class_name="bottle", false_reject_rate=0.01, few_shot=True,
                                           fusion_weight=0.5, version=1, images_version=1, image_threshold=0.5,
                                           calibration={"score_quantiles": {"p50": 0.2}},
                                           calibration_status="ready")))

    stats = db.transaction(lambda s: product_stats(s, "bottle", T0 - timedelta(days=1), now, now, 0.1, 20))
    assert stats["registered"] and stats["total"] == 75 and stats["anomalous"] == 5
    assert stats["anomalous_rate"] == pytest.approx(5 / 75)
    assert stats["reviews"] == {"reviewed": 3, "confirmed_defects": 1, "false_alarms": 1, "missed_defects": 1,
                                "confirmed_good": 0}
    assert stats["threshold"] == 0.5 and stats["threshold_from"] == "product"
    assert [d["day"] for d in stats["daily"]] == ["2026-03-02", "2026-03-04"]
    first, last = stats["daily"]
    assert (first["count"], first["anomalous"], first["good"]) == (45, 5, 40)
    good1 = [r["score"] for r in day1[:40]]
    assert first["good_median"] == pytest.approx(np.median(good1), abs=2e-3)
    assert first["quantiles"]["p95"] == pytest.approx(np.quantile([r["score"] for r in day1], 0.95), abs=2e-2)
    assert not first["drifting"] and abs(first["drift"]) < 0.1
    assert last["drifting"] and last["drift"] == pytest.approx(0.22, abs=0.02)
    hist = stats["histogram"]
    assert sum(hist["good"]) == 70 and sum(hist["anomalous"]) == 5 and len(hist["edges"]) == len(hist["good"]) + 1
    assert hist["edges"][0] <= 0.1 and 0.8 < hist["edges"][-1] <= 1.0  # spans the scores (0.1 .. 0.8)
    assert stats["drift"]["drifting"] and stats["drift"]["good_count"] == 30
    assert stats["drift"]["reference"] == 0.2

    # too few good parts in the window: no judgement; no calibration: no reference
    few = db.transaction(lambda s: drift_last_24h(s, "bottle", 0.2, now, 0.1, 31))
    assert few.good_count == 30 and not few.drifting
    unref = db.transaction(lambda s: product_stats(s, "screw", T0 - timedelta(days=1), now, now, 0.1, 1))
    assert not unref["registered"] and unref["drift"]["reference"] is None and not unref["drift"]["drifting"]
    assert unref["threshold_from"] == "latest_record"
    assert db.transaction(lambda s: product_stats(s, "nothing", T0, now, now, 0.1, 1)) is None
