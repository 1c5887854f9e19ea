"""Redis Streams transport (many workers, many hosts).

Keys (``P`` = ``settings.redis_prefix``):

* ``P:jobs`` - the job stream; consumer group ``P:workers``. The API adds entries with an
  admission script that, atomically, refuses when no worker heartbeat is live or when
  ``XLEN >= queue_max_depth``. Workers ``XACK`` + ``XDEL`` every finished entry, so
  ``XLEN`` is exactly *undelivered (lag) + pending*; nothing is ever trimmed with ``MAXLEN``
  (which would silently delete unprocessed jobs).
* ``P:reply:<job id>`` - the job's own result list: the worker ``LPUSH`` es the result and
  sets a TTL; the API request waiting for that job ``BLPOP`` s it. No shared result list,
  no cross-talk.
* ``P:alive`` - sorted set worker id -> heartbeat expiry (Redis server clock, ms);
  ``P:worker-info`` - hash worker id -> detector identity JSON (for ``/ready``).
* ``P:dead`` - dead-letter stream (job metadata + reason, capped): jobs delivered more than
  ``max_deliveries`` times (e.g. an image that kills workers) are answered with an error.

A worker refreshes the idle time of the entries it is processing on every heartbeat, so a
slow batch is not stolen; entries of a dead worker go idle and another worker reclaims them
with ``XAUTOCLAIM`` after ``reclaim_idle_ms``.

Client sizing (DESIGN.md 5): redis-py asyncio defaults to ``socket_timeout=5`` which kills a
longer ``BLPOP`` / ``XREADGROUP BLOCK``; the blocking clients get a socket timeout above their
block time, and the API's ``BLPOP`` pool has one connection per job that may be waiting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from service.queue.base import (
    ERROR_BAD_JOB,
    ERROR_DEAD_LETTER,
    Job,
    JobQueue,
    JobResult,
    NoWorkerAvailable,
    PendingJob,
    QueueFull,
    QueueUnavailable,
    WorkerInfo,
    WorkSource,
)
from service.queue.jobs import PayloadError, decode_job, decode_result, encode_job, encode_result
from service.settings import Settings

log = logging.getLogger(__name__)

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZCOUNT', KEYS[2], now, '+inf') == 0 then return {'noworker', 0} end
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[1]) then return {'full', depth} end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
return {id, depth + 1}
"""

_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now)
for _, w in ipairs(dead) do redis.call('HDEL', KEYS[2], w) end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. now) end
return dead
"""

_ALIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
local out = {}
for _, w in ipairs(ids) do
  out[#out + 1] = w
  out[#out + 1] = redis.call('HGET', KEYS[2], w) or ''
end
return out
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


class RedisKeys:
    def __init__(self, prefix: str) -> None:
        self.stream = f"{prefix}:jobs"
        self.group = f"{prefix}:workers"
        self.alive = f"{prefix}:alive"
        self.info = f"{prefix}:worker-info"
        self.dead = f"{prefix}:dead"
        self._reply = f"{prefix}:reply:"

    def reply(self, job_id: str) -> str:
        return self._reply + job_id


async def ensure_group(client: aioredis.Redis, keys: RedisKeys) -> None:
    try:
        await client.xgroup_create(keys.stream, keys.group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ====================================================================== API side
class _RedisPending(PendingJob):
    def __init__(self, queue: RedisJobQueue, job: Job) -> None:
        self.queue = queue
        self.job = job

    async def result(self, timeout: float) -> JobResult:
        key = self.queue.keys.reply(self.job.id)
        try:
            if timeout < 0.01:
                payload = await self.queue.client.lpop(key)
            else:
                # BLPOP on the blocking pool (socket timeout above job_timeout_s)
                reply = await self.queue.blocking.blpop([key], timeout=timeout)
                payload = reply[1] if reply else None
        except RedisError as exc:
            raise QueueUnavailable(f"redis error while waiting for the result: {exc}") from exc
        if payload is None:
            raise TimeoutError
        return decode_result(payload)


class RedisJobQueue(JobQueue):
    """API side: admission + XADD, then BLPOP of the job's own reply key."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url
        self.settings = settings
        self.keys = RedisKeys(settings.redis_prefix)
        self.client = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=5.0,
            socket_connect_timeout=2.0,
            max_connections=64,
            health_check_interval=30,
        )
        # one connection per waiting request: admission bounds those to queue_max_depth
        self.blocking = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=settings.queue_max_depth + 16,
                timeout=settings.job_timeout_s,
                socket_timeout=settings.job_timeout_s + 10.0,
                socket_connect_timeout=2.0,
            )
        )
        self._admit = self.client.register_script(_ADMIT)
        self._alive = self.client.register_script(_ALIVE)

    async def start(self) -> None:
        try:
            await ensure_group(self.client, self.keys)
        except RedisError as exc:  # reachable later: /ready reports it, submit answers 503
            log.warning("redis not reachable at start-up: %s", exc)

    async def close(self) -> None:
        await self.client.aclose()
        await self.blocking.aclose()

    async def submit(self, job: Job, file_bytes: bytes | None = None) -> PendingJob:
        fields = encode_job(job, raw_max_bytes=self.settings.raw_transfer_max_bytes, file_bytes=file_bytes)
        args: list[Any] = [self.settings.queue_max_depth]
        for name, value in fields.items():
            args += [name, value]
        try:
            status, depth = await self._admit(keys=[self.keys.stream, self.keys.alive], args=args)
        except RedisError as exc:
            raise QueueUnavailable(f"redis unavailable: {exc}") from exc
        status = _s(status)
        if status == "noworker":
            raise NoWorkerAvailable("no live detector worker (no heartbeat in Redis)")
        if status == "full":
            raise QueueFull(f"queue full ({depth} jobs waiting or in progress)")
        job.transport_ref = status
        return _RedisPending(self, job)

    async def depth(self) -> int:
        try:
            return int(await self.client.xlen(self.keys.stream))
        except RedisError as exc:
            raise QueueUnavailable(f"redis unavailable: {exc}") from exc

    async def workers(self) -> list[WorkerInfo]:
        flat = await self._alive(keys=[self.keys.alive, self.keys.info])
        out = []
        for wid, info in zip(flat[::2], flat[1::2], strict=False):
            try:
                identity = json.loads(info) if info else {}
            except ValueError:
                identity = {}
            out.append(WorkerInfo(_s(wid), identity))
        return out

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except RedisError:
            return False


# ====================================================================== worker side
class RedisWorkSource(WorkSource):
    """Worker side: XREADGROUP batches, XAUTOCLAIM of dead workers' jobs, dead letters."""

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
        )
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._refresh = self.client.register_script(_REFRESH)
        self._identity_json = "{}"
        self._reclaim_every = max(0.05, settings.reclaim_idle_ms / 1000.0 / 4.0)
        self._next_reclaim = 0.0
        self._reclaim_cursor = "0-0"
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if not self._group_ready:
            await ensure_group(self.client, self.keys)
            self._group_ready = True

    async def register(self, worker_id: str, identity: dict[str, Any]) -> None:
        self._identity_json = json.dumps(identity)
        await self._ensure_group()
        await self.heartbeat(worker_id, ())

    async def unregister(self, worker_id: str) -> None:
        try:
            await self.client.zrem(self.keys.alive, worker_id)
            await self.client.hdel(self.keys.info, worker_id)
            summary = await self.client.xpending_range(
                self.keys.stream, self.keys.group, "-", "+", 1, consumername=self.consumer
            )
            if not summary:  # nothing of ours is pending: forget the consumer
                await self.client.xgroup_delconsumer(self.keys.stream, self.keys.group, self.consumer)
        except RedisError as exc:
            log.warning("worker %s: unregister failed: %s", worker_id, exc)

    async def heartbeat(self, worker_id: str, in_flight: Sequence[Job]) -> None:
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        dead = await self._heartbeat(
            keys=[self.keys.alive, self.keys.info], args=[worker_id, ttl_ms, self._identity_json]
        )
        refs = [job.transport_ref for job in in_flight if job.transport_ref]
        if refs:
            await self._refresh(keys=[self.keys.stream], args=[self.keys.group, self.consumer, *refs])
        if dead:
            await self._forget_consumers([_s(d) for d in dead])

    async def _forget_consumers(self, names: list[str]) -> None:
        """Drop consumers of expired workers once they hold nothing pending."""
        for name in names:
            try:
                pending = await self.client.xpending_range(
                    self.keys.stream, self.keys.group, "-", "+", 1, consumername=name
                )
                if not pending:
                    await self.client.xgroup_delconsumer(self.keys.stream, self.keys.group, name)
            except RedisError:
                pass

    async def receive(self, max_jobs: int, timeout: float) -> list[Job]:
        await self._ensure_group()
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + self._reclaim_every
            jobs = await self._reclaim(max_jobs)
            if jobs:
                return jobs
        block_ms = int(min(timeout, 1.0) * 1000)
        reply = await self.client.xreadgroup(
            self.keys.group,
            self.consumer,
            {self.keys.stream: ">"},
            count=max_jobs,
            block=block_ms if block_ms >= 1 else None,  # BLOCK 0 would wait forever
        )
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
        """Take over entries idle for ``reclaim_idle_ms`` (their worker died)."""
        response = await self.client.xautoclaim(
            self.keys.stream,
            self.keys.group,
            self.consumer,
            min_idle_time=self.settings.reclaim_idle_ms,
            start_id=self._reclaim_cursor,
            count=max_jobs,
        )
        next_id, claimed = response[0], response[1]
        self._reclaim_cursor = _s(next_id)
        claimed = [(eid, fields) for eid, fields in (claimed or []) if eid is not None]
        if not claimed:
            return []
        if self._reclaim_cursor != "0-0":
            self._next_reclaim = 0.0  # more may be idle: look again next time
        ids = [_s(eid) for eid, _ in claimed]
        pending = await self.client.xpending_range(
            self.keys.stream, self.keys.group, min(ids, key=_id_key), max(ids, key=_id_key),
            len(ids) + 16, consumername=self.consumer,
        )
        attempts = {_s(p["message_id"]): int(p["times_delivered"]) for p in pending}
        keep, dead = [], []
        for eid, fields in claimed:
            n = attempts.get(_s(eid), 1)
            (dead if n > self.settings.max_deliveries else keep).append((eid, fields))
        log.warning(
            "worker %s reclaimed %d job(s) of dead workers, dead-lettering %d",
            self.consumer, len(keep), len(dead),
        )
        if dead:
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
            if ids:
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
    client = aioredis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
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
