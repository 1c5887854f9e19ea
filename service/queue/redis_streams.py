"""Redis Streams transport (many workers, many hosts).

Keys (``P`` = ``settings.redis_prefix``):

* ``P:jobs`` - the job stream; consumer group ``P:workers``. The API adds entries with an
  admission script that, atomically, refuses when no worker heartbeat is live or when
  ``XLEN`` reaches the depth limit (see :mod:`service.admission`). Workers ``XACK`` + ``XDEL``
  every finished entry, so ``XLEN`` is exactly *undelivered (lag) + pending*; nothing is ever
  trimmed with ``MAXLEN`` (which would silently delete unprocessed jobs).
* ``P:reply:<job id>`` - the job's own result list: the worker ``LPUSH`` es the result and
  sets a TTL in the same transaction that acknowledges and deletes the entry; the API request
  waiting for that job ``BLPOP`` s it. No shared result list, no cross-talk.
* ``P:alive`` - sorted set worker id -> heartbeat expiry (Redis server clock, ms);
  ``P:worker-info`` - hash worker id -> detector identity JSON (for ``/ready``);
  ``P:worker-load`` - hash worker id -> progress JSON (last progress and batch start on the
  server clock, jobs/s, batch seconds: :mod:`service.queue.progress`).
* ``P:dead`` - dead-letter stream (job metadata + reason, capped): jobs delivered more than
  ``max_deliveries`` times (e.g. an image that kills workers) are answered with an error.

Failures handled (DESIGN.md 5):

* **Redis restart or failover** (stream, group, heartbeats gone): nothing caches "the group
  exists"; every command that can answer ``NOGROUP`` (``XREADGROUP``, ``XAUTOCLAIM``,
  ``XCLAIM``, ``XPENDING``) recreates the group and retries once, and the admission script
  creates it before every ``XADD``. Clients fail fast (one reconnect attempt, no hidden retry
  loop); the worker loop retries with backoff (<= 1 s), the API side answers 503 while Redis
  is down (a short circuit breaker spares it connect timeouts). The next heartbeat re-registers
  the worker.
* **Jobs lost with Redis**: a request does not wait on one long ``BLPOP`` (which redis-py
  would silently re-issue on a new connection to the new, empty Redis): it waits in slices,
  and between slices a script checks atomically that its reply is there, or its entry still
  is, or answers that the job is lost (503 ``job_lost``).
* **Dead worker**: a live worker whose heartbeat finds another's expired takes that worker's
  pending entries at once (``XCLAIM``) instead of waiting ``reclaim_idle_ms``; when no worker
  is alive at all, the waiting request's check drops its entry and answers 503 ``no_worker``.
  ``XAUTOCLAIM`` after ``reclaim_idle_ms`` remains the safety net.
* **Connection use is bounded**: short commands share one pool behind a semaphore of the same
  size, ``BLPOP`` slices another (sized for one waiting request per admitted job); a request
  that finds its pool busy waits its turn instead of failing with "Too many connections".

A worker refreshes the idle time of the entries it is processing on every heartbeat, so a
slow batch is not stolen. redis-py asyncio defaults to ``socket_timeout=5``, which kills a
longer ``BLPOP`` / ``XREADGROUP BLOCK``: blocking clients get a socket timeout above their
block time.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from service.queue.base import (
    ERROR_BAD_JOB,
    ERROR_DEAD_LETTER,
    Job,
    JobLost,
    JobQueue,
    JobResult,
    MalformedResult,
    NoWorkerAvailable,
    PendingJob,
    QueueError,
    QueueFull,
    QueueUnavailable,
    WorkerInfo,
    WorkSource,
)
from service.queue.jobs import PayloadError, decode_job, decode_result, encode_job, encode_result
from service.queue.progress import ProgressMeter, QueueLoad, WorkerLoad, WorkerProgress
from service.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# API side: commands that are not BLPOP share this many connections.
API_POOL_SIZE = 32
# A waiting request BLPOPs its reply in slices this long, checking its job between slices.
WAIT_SLICE_S = 0.5
# While Redis cannot be reached, a waiting request keeps trying this long before its 503.
OUTAGE_GRACE_S = 1.0
# A short command waits at most this long for one of the pool's connections.
SLOT_WAIT_S = 1.0
# API circuit breaker: after a connection failure, answer 503 without trying for this long
# (doubling up to the max while failures go on).
BREAKER_MIN_S, BREAKER_MAX_S = 0.05, 1.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: stream, alive. ARGV: max depth, group, field, value, ...
_ADMIT = _NOW + """
if redis.call('ZCOUNT', KEYS[2], now, '+inf') == 0 then return {'noworker', 0} end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {'full', depth} end
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[2], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return {id, depth + 1}
"""

# KEYS: alive, info, load. ARGV: worker, ttl ms, identity json, progress age ms, busy ms (-1: idle),
# rate (-1: unknown), batch seconds (-1: unknown). Returns the workers found expired.
_HEARTBEAT = _NOW + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local load = {progress_at = now - tonumber(ARGV[4])}
if tonumber(ARGV[5]) >= 0 then load['busy_since'] = now - tonumber(ARGV[5]) end
if tonumber(ARGV[6]) >= 0 then load['rate'] = tonumber(ARGV[6]) end
if tonumber(ARGV[7]) >= 0 then load['batch_s'] = tonumber(ARGV[7]) end
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode(load))
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
for _, w in ipairs(dead) do
  redis.call('HDEL', KEYS[2], w)
  redis.call('HDEL', KEYS[3], w)
end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now) end
return dead
"""

# KEYS: alive, info, load, stream. Returns {now ms, xlen, id, info, load, id, info, load, ...}.
_LOAD = _NOW + """
local out = {now, redis.call('XLEN', KEYS[4])}
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  out[#out + 1] = w
  out[#out + 1] = redis.call('HGET', KEYS[2], w) or ''
  out[#out + 1] = redis.call('HGET', KEYS[3], w) or ''
end
return out
"""

# Where is my job? KEYS: reply, stream, alive. ARGV: entry id, job id, group.
# 'reply' + payload | 'wait' (entry there, a worker alive) | 'lost' (neither entry nor reply:
# Redis lost it) | 'noworker' (no live worker: the entry is dropped, nobody will serve it).
_CHECK = _NOW + """
local r = redis.call('LPOP', KEYS[1])
if r then return {'reply', r} end
local e = redis.call('XRANGE', KEYS[2], ARGV[1], ARGV[1])
if #e == 0 then return {'lost', ''} end
local mine = false
local f = e[1][2]
for i = 1, #f, 2 do
  if f[i] == 'meta' then
    local ok, meta = pcall(cjson.decode, f[i + 1])
    mine = ok and type(meta) == 'table' and meta['id'] == ARGV[2]
  end
end
if not mine then return {'lost', ''} end
if redis.call('ZCOUNT', KEYS[3], now, '+inf') == 0 then
  redis.pcall('XACK', KEYS[2], ARGV[3], ARGV[1])
  redis.call('XDEL', KEYS[2], ARGV[1])
  return {'noworker', ''}
end
return {'wait', ''}
"""

# Reset the idle time of entries this consumer still owns (no delivery-count increase).
_REFRESH = """
local kept = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    kept = kept + 1
  end
end
return kept
"""


class BreakerOpen(RedisConnectionError):
    """The API does not try Redis for a moment after a connection failure."""


class RedisBusy(QueueError):
    """Every API connection to Redis stayed busy too long: Redis (or its host) is overloaded."""

    reason = "overloaded"


class RedisKeys:
    def __init__(self, prefix: str) -> None:
        self.stream = f"{prefix}:jobs"
        self.group = f"{prefix}:workers"
        self.alive = f"{prefix}:alive"
        self.info = f"{prefix}:worker-info"
        self.load = f"{prefix}:worker-load"
        self.dead = f"{prefix}:dead"
        self._reply = f"{prefix}:reply:"

    def reply(self, job_id: str) -> str:
        return self._reply + job_id


def fail_fast_retry() -> Retry:
    """One immediate reconnect attempt (a pooled connection may be stale after a Redis
    restart), then the error: retry policy belongs to the caller, which knows its deadline."""
    return Retry(NoBackoff(), 1)


async def ensure_group(client: aioredis.Redis, keys: RedisKeys) -> None:
    try:
        await client.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def connection_errors_as_redis(awaitable: Awaitable[T]) -> T:
    """Await a redis-py call; socket-level failures redis-py lets through (``OSError``; under
    uvloop, ``RuntimeError`` "the handler is closed" when Redis dropped the connection while a
    command was being written) become ``redis.exceptions.ConnectionError``."""
    try:
        return await awaitable
    except (OSError, RuntimeError) as exc:
        raise RedisConnectionError(f"connection to redis lost: {exc}") from exc


def is_nogroup(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _progress(now_ms: float, raw: Any) -> WorkerProgress | None:
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        return None
    if not isinstance(data, dict) or "progress_at" not in data:
        return None
    busy = data.get("busy_since")
    return WorkerProgress(
        progress_age_s=max(0.0, (now_ms - float(data["progress_at"])) / 1000.0),
        busy_s=None if busy is None else max(0.0, (now_ms - float(busy)) / 1000.0),
        rate=float(data["rate"]) if data.get("rate") is not None else None,
        batch_s=float(data["batch_s"]) if data.get("batch_s") is not None else None,
    )


# ====================================================================== API side
class _RedisPending(PendingJob):
    def __init__(self, queue: RedisJobQueue, job: Job) -> None:
        self.queue = queue
        self.job = job

    async def result(self, timeout: float) -> JobResult:
        """Wait for the reply in slices; between slices check that the job still exists."""
        q = self.queue
        key = q.keys.reply(self.job.id)
        deadline = time.monotonic() + max(0.0, timeout)
        outage_since: float | None = None
        while True:
            remaining = deadline - time.monotonic()
            try:
                payload = None
                if remaining >= 0.01:
                    payload = await q.blpop(key, min(remaining, WAIT_SLICE_S))
                if payload is None:
                    status, payload = await q.check(self.job, key)
                    if status == "wait":
                        if deadline - time.monotonic() <= 0:
                            raise TimeoutError
                        outage_since = None
                        continue
                    if status == "lost":
                        raise JobLost(
                            f"job {self.job.id} is gone from the queue without a result "
                            "(Redis restarted or failed over and lost it)"
                        )
                    if status == "noworker":
                        raise NoWorkerAvailable(
                            f"job {self.job.id}: its worker died and no live detector worker remains"
                        )
                return self.queue.decode(payload)
            except RedisError as exc:
                now = time.monotonic()
                outage_since = outage_since or now
                if now - outage_since >= OUTAGE_GRACE_S or now >= deadline:
                    raise QueueUnavailable(
                        f"redis unreachable while waiting for the result of job {self.job.id}: {exc}"
                    ) from exc
                await asyncio.sleep(0.1)


class RedisJobQueue(JobQueue):
    """API side: admission + XADD, then the job's own reply key (see the module docstring)."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url
        self.settings = settings
        self.keys = RedisKeys(settings.redis_prefix)
        self.client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=API_POOL_SIZE,
            timeout=None,  # never waited on: the semaphore below hands out connections
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            health_check_interval=30,
            retry=fail_fast_retry(),
        ))
        self._slots = asyncio.Semaphore(API_POOL_SIZE)
        # one connection per waiting request: admission bounds those to about queue_max_depth
        self.wait_pool_size = settings.queue_max_depth + 16
        self.blocking = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=self.wait_pool_size,
            timeout=None,
            socket_timeout=WAIT_SLICE_S + 10.0,
            socket_connect_timeout=2.0,
            retry=fail_fast_retry(),
        ))
        self._wait_slots = asyncio.Semaphore(self.wait_pool_size)
        self._admit = self.client.register_script(_ADMIT)
        self._load = self.client.register_script(_LOAD)
        self._check = self.client.register_script(_CHECK)
        self._down_until = 0.0
        self._breaker_s = BREAKER_MIN_S

    # ------------------------------------------------------------------ plumbing
    async def _call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a short command on the shared pool (one connection per semaphore slot, so the
        pool is never exhausted), through the circuit breaker."""
        if time.monotonic() < self._down_until:
            raise BreakerOpen("redis unreachable moments ago; not retrying yet")
        try:
            await asyncio.wait_for(self._slots.acquire(), SLOT_WAIT_S)
        except TimeoutError:
            raise RedisBusy(f"all {API_POOL_SIZE} redis connections busy for {SLOT_WAIT_S:g} s (redis slow)") from None
        try:
            result = await connection_errors_as_redis(fn())
        except RedisError as exc:
            if not isinstance(exc, ResponseError):
                self._down_until = time.monotonic() + self._breaker_s
                self._breaker_s = min(BREAKER_MAX_S, self._breaker_s * 2)
            raise
        finally:
            self._slots.release()
        self._breaker_s = BREAKER_MIN_S
        return result

    async def blpop(self, key: str, timeout: float) -> bytes | None:
        """BLPOP on the waiting pool; falls back to a check when no connection frees in time."""
        try:
            await asyncio.wait_for(self._wait_slots.acquire(), timeout)
        except TimeoutError:
            return None
        try:
            reply = await connection_errors_as_redis(self.blocking.blpop([key], timeout=max(timeout, 0.01)))
        finally:
            self._wait_slots.release()
        return reply[1] if reply else None

    async def check(self, job: Job, reply_key: str) -> tuple[str, bytes]:
        status, payload = await self._call(lambda: self._check(
            keys=[reply_key, self.keys.stream, self.keys.alive],
            args=[job.transport_ref, job.id, self.keys.group],
        ))
        return _s(status), payload

    def decode(self, payload: bytes) -> JobResult:
        try:
            return decode_result(payload, max_pixels=self.settings.max_image_pixels)
        except PayloadError as exc:
            raise MalformedResult(f"malformed result from a worker: {exc}") from exc

    # ------------------------------------------------------------------ JobQueue
    async def start(self) -> None:
        try:
            await ensure_group(self.client, self.keys)
        except RedisError as exc:  # reachable later: /ready reports it, submit answers 503
            log.warning("redis not reachable at start-up: %s", exc)

    async def close(self) -> None:
        await self.client.aclose()
        await self.blocking.aclose()

    async def submit(self, job: Job, file_bytes: bytes | None = None, *, max_depth: int | None = None) -> PendingJob:
        fields = encode_job(job, raw_max_bytes=self.settings.raw_transfer_max_bytes, file_bytes=file_bytes)
        limit = self.settings.queue_max_depth if max_depth is None else min(max_depth, self.settings.queue_max_depth)
        args: list[Any] = [limit, self.keys.group]
        for name, value in fields.items():
            args += [name, value]
        try:
            status, depth = await self._call(lambda: self._admit(keys=[self.keys.stream, self.keys.alive], args=args))
        except RedisError as exc:
            raise QueueUnavailable(f"redis unavailable: {exc}") from exc
        status = _s(status)
        if status == "noworker":
            raise NoWorkerAvailable("no live detector worker (no heartbeat in Redis)")
        if status == "full":
            raise QueueFull(f"queue full ({depth} jobs waiting or in progress, admitting below {limit})")
        job.transport_ref = status
        return _RedisPending(self, job)

    async def load(self) -> QueueLoad:
        keys = self.keys
        try:
            flat = await self._call(lambda: self._load(keys=[keys.alive, keys.info, keys.load, keys.stream]))
        except RedisError as exc:
            raise QueueUnavailable(f"redis unavailable: {exc}") from exc
        now_ms, depth, rest = float(flat[0]), int(flat[1]), flat[2:]
        workers = []
        for wid, info, load in zip(rest[::3], rest[1::3], rest[2::3], strict=False):
            try:
                identity = json.loads(info) if info else {}
            except ValueError:
                identity = {}
            workers.append(WorkerLoad(_s(wid), identity if isinstance(identity, dict) else {}, _progress(now_ms, load)))
        return QueueLoad(depth, workers)

    async def depth(self) -> int:
        return (await self.load()).depth

    async def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(w.worker_id, w.identity) for w in (await self.load()).workers]

    async def ping(self) -> bool:
        try:
            return bool(await self._call(self.client.ping))
        except (RedisError, QueueError):
            return False


# ====================================================================== worker side
class RedisWorkSource(WorkSource):
    """Worker side: XREADGROUP batches, dead workers' jobs taken over, dead letters."""

    def __init__(self, settings: Settings, consumer: str) -> None:
        assert settings.redis_url
        self.settings = settings
        self.keys = RedisKeys(settings.redis_prefix)
        self.consumer = consumer
        # XREADGROUP BLOCK is at most ~1 s per call (see receive): socket timeout well above
        self.client = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=30.0,
            socket_connect_timeout=2.0,
            max_connections=8,
            health_check_interval=30,
            retry=fail_fast_retry(),
        )
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._refresh = self.client.register_script(_REFRESH)
        self._identity_json = "{}"
        self._meter: ProgressMeter | None = None
        self._reclaim_every = max(0.05, settings.reclaim_idle_ms / 1000.0 / 4.0)
        self._next_reclaim = 0.0
        self._reclaim_cursor = "0-0"
        # entries taken over from dead workers, served before new ones: (entry id, fields, deliveries)
        self._taken: collections.deque[tuple[bytes, dict, int]] = collections.deque()

    async def _grouped(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a command that needs the consumer group; on NOGROUP (Redis restarted or failed
        over: stream and group gone) recreate it and try once more."""
        try:
            return await fn()
        except ResponseError as exc:
            if not is_nogroup(exc):
                raise
            log.warning("worker %s: consumer group missing (Redis restarted?): recreating it", self.consumer)
            await ensure_group(self.client, self.keys)
            return await fn()

    def track_progress(self, worker_id: str, meter: ProgressMeter) -> None:
        self._meter = meter

    async def register(self, worker_id: str, identity: dict[str, Any]) -> None:
        self._identity_json = json.dumps(identity)
        try:
            await ensure_group(self.client, self.keys)
            await self.heartbeat(worker_id, ())
        except RedisError as exc:  # the heartbeat loop registers once Redis answers
            log.warning("worker %s: cannot register yet (%s); retrying with the heartbeat", worker_id, exc)

    async def unregister(self, worker_id: str) -> None:
        try:
            await self.client.zrem(self.keys.alive, worker_id)
            await self.client.hdel(self.keys.info, worker_id)
            await self.client.hdel(self.keys.load, worker_id)
            summary = await self.client.xpending_range(
                self.keys.stream, self.keys.group, "-", "+", 1, consumername=self.consumer
            )
            if not summary:  # nothing of ours is pending: forget the consumer
                await self.client.xgroup_delconsumer(self.keys.stream, self.keys.group, self.consumer)
        except RedisError as exc:
            log.warning("worker %s: unregister failed: %s", worker_id, exc)

    async def heartbeat(self, worker_id: str, in_flight: Sequence[Job]) -> None:
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        p = self._meter.snapshot() if self._meter is not None else None
        progress = [
            int(p.progress_age_s * 1000) if p else 0,
            int(p.busy_s * 1000) if p and p.busy_s is not None else -1,
            p.rate if p and p.rate is not None else -1,
            p.batch_s if p and p.batch_s is not None else -1,
        ]
        dead = await self._heartbeat(
            keys=[self.keys.alive, self.keys.info, self.keys.load],
            args=[worker_id, ttl_ms, self._identity_json, *progress],
        )
        refs = [job.transport_ref for job in in_flight if job.transport_ref]
        if refs:
            await self._grouped(lambda: self._refresh(keys=[self.keys.stream], args=[self.keys.group, self.consumer, *refs]))
        if dead:
            names = [_s(d) for d in dead if _s(d) != self.consumer]
            if names:
                await self._take_over(names)

    async def _take_over(self, names: list[str]) -> None:
        """Claim the pending entries of workers whose heartbeat expired (served next), then
        forget those consumers."""
        for name in names:
            try:
                pending = await self._grouped(lambda n=name: self.client.xpending_range(
                    self.keys.stream, self.keys.group, "-", "+", 10_000, consumername=n))
                if pending:
                    ids = [p["message_id"] for p in pending]
                    delivered = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
                    claimed = await self._grouped(lambda i=ids: self.client.xclaim(
                        self.keys.stream, self.keys.group, self.consumer, 0, i))
                    for eid, fields in claimed or []:
                        if eid is not None:
                            self._taken.append((eid, fields, delivered.get(_s(eid), 0) + 1))
                    log.warning("worker %s took over %d job(s) of dead worker %s",
                                self.consumer, len(claimed or []), name)
                await self.client.xgroup_delconsumer(self.keys.stream, self.keys.group, name)
            except RedisError as exc:
                log.warning("worker %s: taking over the jobs of %s failed: %s", self.consumer, name, exc)

    async def receive(self, max_jobs: int, timeout: float) -> list[Job]:
        if self._taken:
            entries = [self._taken.popleft() for _ in range(min(max_jobs, len(self._taken)))]
            return await self._sort_deliveries([(eid, fields) for eid, fields, _ in entries],
                                               {_s(eid): n for eid, _, n in entries})
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self._reclaim_every
            jobs = await self._reclaim(max_jobs)
            if jobs:
                return jobs
        block_ms = int(min(timeout, 1.0) * 1000)
        reply = await self._grouped(lambda: self.client.xreadgroup(
            self.keys.group,
            self.consumer,
            {self.keys.stream: ">"},
            count=max_jobs,
            block=block_ms if block_ms >= 1 else None,  # BLOCK 0 would wait forever
        ))
        entries: list[tuple[bytes, dict]] = []
        if isinstance(reply, dict):  # RESP3
            for value in reply.values():
                entries.extend(value[0] if value and isinstance(value[0], list) else value)
        elif reply:
            for _stream, items in reply:
                entries.extend(items)
        return await self._to_jobs(entries, {})

    async def _to_jobs(self, entries: list[tuple[bytes, dict]], attempts: dict[str, int]) -> list[Job]:
        jobs: list[Job] = []
        bad: list[tuple[Job, JobResult]] = []
        for entry_id, fields in entries:
            eid = _s(entry_id)
            if not fields:  # deleted under us
                await self._ack([eid])
                continue
            try:
                job = decode_job(fields, max_pixels=self.settings.max_image_pixels)
            except PayloadError as exc:
                job_id = _job_id_of(fields) or eid
                log.error("dropping malformed stream entry %s: %s", eid, exc)
                placeholder = Job(id=job_id, class_name=None, deadline=0.0, transport_ref=eid)
                bad.append((placeholder, JobResult.failure(placeholder, ERROR_BAD_JOB, str(exc))))
                continue
            job.transport_ref = eid
            job.attempt = attempts.get(eid, 1)
            jobs.append(job)
        if bad:
            await self.complete(bad)
        return jobs

    async def _reclaim(self, max_jobs: int) -> list[Job]:
        """Take over entries idle for ``reclaim_idle_ms`` (their worker died unnoticed)."""
        response = await self._grouped(lambda: self.client.xautoclaim(
            self.keys.stream,
            self.keys.group,
            self.consumer,
            min_idle_time=self.settings.reclaim_idle_ms,
            start_id=self._reclaim_cursor,
            count=max_jobs,
        ))
        next_id, claimed = response[0], response[1]
        self._reclaim_cursor = _s(next_id)
        claimed = [(eid, fields) for eid, fields in (claimed or []) if eid is not None]
        if not claimed:
            return []
        if self._reclaim_cursor != "0-0":
            self._next_reclaim = 0.0  # more may be idle: look again next time
        ids = [_s(eid) for eid, _ in claimed]
        pending = await self._grouped(lambda: self.client.xpending_range(
            self.keys.stream, self.keys.group, min(ids, key=_id_key), max(ids, key=_id_key),
            len(ids) + 16, consumername=self.consumer,
        ))
        attempts = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
        log.warning("worker %s reclaimed %d idle job(s)", self.consumer, len(claimed))
        return await self._sort_deliveries(claimed, attempts)

    async def _sort_deliveries(self, entries: list[tuple[bytes, dict]], attempts: dict[str, int]) -> list[Job]:
        """Jobs for entries delivered again; those over ``max_deliveries`` are dead-lettered."""
        keep, dead = [], []
        for eid, fields in entries:
            n = attempts.get(_s(eid), 1)
            (dead if n > self.settings.max_deliveries else keep).append((eid, fields))
        if dead:
            log.warning("worker %s: dead-lettering %d job(s)", self.consumer, len(dead))
            await self._dead_letter(dead, attempts)
        return await self._to_jobs(keep, attempts)

    async def _dead_letter(self, entries: list[tuple[bytes, dict]], attempts: dict[str, int]) -> None:
        results: list[tuple[Job, JobResult]] = []
        for entry_id, fields in entries:
            eid = _s(entry_id)
            job_id = _job_id_of(fields) or eid
            n = attempts.get(eid, 0)
            job = Job(id=job_id, class_name=None, deadline=0.0, transport_ref=eid)
            message = (
                f"job {job_id} was delivered {n - 1} time(s) without finishing "
                f"(max_deliveries={self.settings.max_deliveries}): dead-lettered"
            )
            results.append((job, JobResult.failure(job, ERROR_DEAD_LETTER, message, worker=self.consumer)))
            meta = fields.get(b"meta", b"{}") if fields else b"{}"
            await self.client.xadd(
                self.keys.dead,
                {"entry": eid, "job_id": job_id, "deliveries": n, "meta": meta, "at": time.time()},
                maxlen=1000,
                approximate=True,
            )
        await self.complete(results)

    async def _ack(self, ids: list[str]) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.stream, self.keys.group, *ids)
            pipe.xdel(self.keys.stream, *ids)
            await pipe.execute()

    async def complete(self, results: Sequence[tuple[Job, JobResult]]) -> None:
        if not results:
            return
        ttl = self.settings.result_ttl_s
        async with self.client.pipeline(transaction=True) as pipe:
            for job, result in results:
                key = self.keys.reply(job.id)
                pipe.lpush(key, encode_result(result))
                pipe.expire(key, ttl)
            ids = [job.transport_ref for job, _ in results if job.transport_ref]
            if ids:  # XACK of a missing group answers 0, not NOGROUP: the reply still goes out
                pipe.xack(self.keys.stream, self.keys.group, *ids)
                pipe.xdel(self.keys.stream, *ids)
            await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _job_id_of(fields: dict | None) -> str | None:
    try:
        return str(json.loads(fields[b"meta"])["id"]) if fields else None
    except (KeyError, TypeError, ValueError):
        return None


async def wait_for_redis(url: str, timeout: float = 10.0) -> None:
    """Block until Redis answers PING (start-up of a worker next to a starting Redis)."""
    client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=fail_fast_retry())
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                await client.ping()
                return
            except RedisError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await client.aclose()
