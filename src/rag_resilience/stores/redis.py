"""Redis store: one circuit, one cache and one concurrency limit for every replica.

Why it looks like this:

* **Atomic without pinning connections.** `update` reads the value (one round trip),
  runs the caller's pure `fn` locally and writes back with a compare-and-set Lua script
  that only applies if the value is still the one read; on a conflict it retries with
  the value the script returned (so `fn` may run more than once, as the Store contract
  allows). When `fn` leaves the value unchanged no write is sent at all, so the common
  "breaker closed, nothing to record" path costs a single GET. Operations whose logic
  is fixed (cache LRU, leases) are single Lua scripts: one round trip, atomic.
* **Keys and values.** Keys live under ``{prefix}:kv:<key>``,
  ``{prefix}:cache:{<namespace>}:...`` and ``{prefix}:lease:{<key>}`` (the braces are
  Redis Cluster hash tags: one namespace's keys share a slot). Values are JSON, never
  pickle: a cache shared over the network must not be a code-execution hole.
* **Redis faults never break the caller.** Every operation gives up within `op_timeout`
  (socket timeouts on the clients built here; a refused or reset connection fails at
  once), then serves from process-local state (`stores.failover`). A refused connection
  or a timeout confirmed by a PING on a connection of its own is an outage: one warning,
  then no call sends Redis anything; a background PING once per `retry_interval` probes
  it, ``redis back`` logged when one succeeds (so a stall costs a call one op timeout,
  never a second one for a probe; async ops are bounded by one op timeout in total,
  reconnect included). Load is not an outage: a pool with no free connection (the pool is a
  `BlockingConnectionPool` of `max_connections`) or an unconfirmed timeout serves that op
  locally (``counters["busy"]``), and a lease request Redis was too busy for is simply not
  granted, so a burst never exceeds the shared limit.
* **Local state starts from shared state.** Values read from Redis are mirrored locally,
  so an operation that falls back sees the last shared state (a half-open circuit stays
  half-open). Reads (`get`) are served from a local view at most `view_ttl` old (own
  writes go through it), so a closed, healthy shared breaker costs one Redis read per
  process per `view_ttl`; a trip on another replica is seen within `view_ttl` + one read.
* **Values fail soft.** An unreadable value (not UTF-8, not JSON, a key of the wrong
  Redis type) is logged once, read as absent and overwritten by the next write.
* **Leases are never stranded.** Tokens are chosen by the caller before the script runs;
  a release also leaves a short-lived tombstone, so a grant that executes after its
  release (a cancelled or timed-out caller's script) is refused; releases that cannot
  reach Redis are sent, pipelined, when it is back. Waiters are served first come, first
  served across processes (a queue in Redis; see `lease_wait`); a release hands the freed
  permit to the oldest waiter in the same script and announces it on pub/sub, so the
  waiter's process admits it without another round trip. Lease times use the
  Redis server's clock (`server_time`), so a host whose clock is off cannot expire
  other hosts' leases.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .. import _validate as _v
from .base import JSON, Store, UpdateFn
from .failover import Failover
from .memory import MemoryStore
from .sqlite import dumps

__all__ = ["RedisStore"]

logger = logging.getLogger("rag_resilience")

T = TypeVar("T")
R = TypeVar("R")

_MAX_CAS_ATTEMPTS = 1000
_LEASE_GC_GRACE_S = 60.0  # a lease key whose every holder died disappears this long after
_TIME_REFRESH_S = 5.0  # how often server_time() re-measures the Redis clock
_POOL_EMPTY = "No connection available"
_WAITER_GONE_S = 1.0  # a queued waiter that has not asked again for this long left
_FLUSH_BATCH = (
    200  # deferred releases per pipelined round trip  # redis-py's BlockingConnectionPool timed out
)

# KEYS[1]=key; ARGV: 1 expect_absent ('1'/'0'), 2 expected text, 3 delete ('1'/'0'),
# 4 new text, 5 ttl in ms (0 = none). Returns {1} when applied, {0, current} otherwise.
_CAS = """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur then return {0, cur} end
elseif cur ~= ARGV[2] then
  if cur then return {0, cur} end
  return {0}
end
if ARGV[3] == '1' then
  redis.call('DEL', KEYS[1])
else
  local ms = tonumber(ARGV[5])
  if ms > 0 then redis.call('SET', KEYS[1], ARGV[4], 'PX', ms)
  else redis.call('SET', KEYS[1], ARGV[4]) end
end
return {1}
"""

# KEYS: 1 entry hash, 2 LRU zset, 3 sequence; ARGV: 1 key, 2 now.
_CACHE_GET = """
local h = redis.call('HMGET', KEYS[1], 'v', 't', 'e')
if not h[1] then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
if h[3] and h[3] ~= '' and tonumber(h[3]) <= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
return {h[1], h[2]}
"""

# KEYS: 1 entry hash, 2 LRU zset, 3 sequence; ARGV: 1 key, 2 value, 3 stored_at,
# 4 expires_at ('' = never), 5 native ttl ms (0 = none), 6 max entries (-1 = none),
# 7 entry key prefix (victims are ARGV[7] .. key, same hash slot).
_CACHE_SET = """
local fresh = redis.call('EXISTS', KEYS[2]) == 0
redis.call('HSET', KEYS[1], 'v', ARGV[2], 't', ARGV[3], 'e', ARGV[4])
local px = tonumber(ARGV[5])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
if px > 0 then
  redis.call('PEXPIRE', KEYS[1], px)
  local cur = redis.call('PTTL', KEYS[2])
  if fresh or (cur >= 0 and cur < px) then
    redis.call('PEXPIRE', KEYS[2], px)
    redis.call('PEXPIRE', KEYS[3], px)
  end
else
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[3])
end
local max = tonumber(ARGV[6])
if max >= 0 then
  local n = redis.call('ZCARD', KEYS[2])
  if n > max then
    for _, k in ipairs(redis.call('ZRANGE', KEYS[2], 0, n - max - 1)) do
      redis.call('DEL', ARGV[7] .. k)
    end
    redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - max - 1)
  end
end
return 1
"""

# KEYS: 1 entry hash, 2 LRU zset; ARGV: 1 key.
_CACHE_DELETE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

# KEYS: 1 LRU zset, 2 sequence; ARGV: 1 entry key prefix.
_CACHE_CLEAR = """
for _, k in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('DEL', ARGV[1] .. k)
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

# KEYS: 1 LRU zset; ARGV: 1 now, 2 entry key prefix. Entries Redis expired natively are
# not counted (their LRU member is a ghost until the next get/set prunes it).
_CACHE_LEN = """
local n = 0
for _, k in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local e = redis.call('HGET', ARGV[2] .. k, 'e')
  if e and (e == '' or tonumber(e) > tonumber(ARGV[1])) then n = n + 1 end
end
return n
"""

# KEYS: 1 lease zset (token -> expiry), 2 the token's tombstone, 3 waiter queue (token ->
# ticket), 4 waiter heartbeats (token -> last ask), 5 ticket counter; ARGV: 1 token,
# 2 limit, 3 expiry, 4 now, 5 gc ms, 6 wait ('1': queue this token), 7 waiters last seen
# before this are gone. A released token's tombstone refuses a grant that arrives late (a
# script whose caller was cancelled or timed out, run after the release). Free permits go
# to the oldest waiters first; a newcomer takes one only if more are free than wait.
_LEASE_ACQUIRE = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
local px = tonumber(ARGV[5])
local function grant()
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  if redis.call('PTTL', KEYS[1]) < px then redis.call('PEXPIRE', KEYS[1], px) end
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 1
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return grant() end
local free = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1])
local waiting = redis.call('ZCARD', KEYS[3])
if waiting == 0 then
  if free > 0 then return grant() end
  if ARGV[6] ~= '1' then return 0 end
else
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[7])) do
    redis.call('ZREM', KEYS[3], t)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[7])
end
local rank = redis.call('ZRANK', KEYS[3], ARGV[1])
if not rank then
  if free > redis.call('ZCARD', KEYS[3]) then return grant() end
  if ARGV[6] ~= '1' then return 0 end
  redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), ARGV[1])
  rank = redis.call('ZRANK', KEYS[3], ARGV[1])
end
if rank < free then return grant() end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], px) end
return -1 - rank
"""


# KEYS: 1 lease zset, 2 the token's tombstone, 3 waiter queue, 4 waiter heartbeats;
# ARGV: 1 token, 2 tombstone ms (0: none, the holder knew its grant), 3 pub/sub channel
# ('' = none), 4 sender id, 5 now ('' = no hand-off), 6 expiry of a handed lease, 7 waiters
# last seen before this are gone, 8 limit. Also how a waiter that gives up leaves the
# queue. A permit freed while others wait goes straight to the oldest live waiter (FIFO,
# never over the limit) and is announced on the channel ("granted:<token>"), so that
# waiter's process admits it without another round trip; without a hand-off, waiters are
# woken to ask ("release"). Returns the token handed to, or 1.
_LEASE_RELEASE = """
local held = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[2]) end
if held == 0 or ARGV[3] == '' or redis.call('ZCARD', KEYS[3]) == 0 then return 1 end
if ARGV[5] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[5])
  for _, t in ipairs(redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', ARGV[7])) do
    redis.call('ZREM', KEYS[3], t)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[7])
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if head and redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[8]) then
    redis.call('ZADD', KEYS[1], ARGV[6], head)
    redis.call('ZREM', KEYS[3], head)
    redis.call('ZREM', KEYS[4], head)
    redis.call('PUBLISH', ARGV[3], cjson.encode({s = 'granted:' .. head, from = ARGV[4]}))
    return head
  end
end
redis.call('PUBLISH', ARGV[3], cjson.encode({s = 'release', from = ARGV[4]}))
return 1
"""


class _CallerError(Exception):
    """Carries an exception raised by the caller's `fn` past the Redis fault handler."""

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


class _Script:
    """A Lua script called by SHA (one round trip), loaded on first NOSCRIPT."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def __call__(
        self, client: Any, no_script: type[Exception], keys: list[str], args: list[Any]
    ) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except no_script:
            return client.eval(self.source, len(keys), *keys, *args)

    async def acall(
        self, client: Any, no_script: type[Exception], keys: list[str], args: list[Any]
    ) -> Any:
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except no_script:
            return await client.eval(self.source, len(keys), *keys, *args)


_SCRIPTS = {
    name: _Script(src)
    for name, src in {
        "cas": _CAS,
        "cache_get": _CACHE_GET,
        "cache_set": _CACHE_SET,
        "cache_delete": _CACHE_DELETE,
        "cache_clear": _CACHE_CLEAR,
        "cache_len": _CACHE_LEN,
        "lease_acquire": _LEASE_ACQUIRE,
        "lease_release": _LEASE_RELEASE,
    }.items()
}


def _import_redis() -> Any:
    try:
        import redis
        import redis.asyncio
        import redis.asyncio.retry
        import redis.backoff
        import redis.retry
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "RedisStore needs the `redis` package: pip install rag-resilience[redis]"
        ) from exc
    return redis


def _text(raw: Any) -> str | None:
    """Redis replies are bytes unless the client decodes responses."""
    if raw is None or raw is False:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _num(x: float) -> str:
    """A float as text Lua's tonumber() reads back exactly (repr round-trips)."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"times must be finite numbers, got {x!r}")
    return repr(x)


def _ms(seconds: float) -> int:
    """Positive milliseconds for PX/PEXPIRE (Redis rejects 0)."""
    return max(1, math.ceil(seconds * 1000))


class RedisStore(Store):
    """A `Store` on Redis, shared by every process and host that uses the same `prefix`.

    Build it from a `url` (clients are created here with `op_timeout` socket timeouts,
    one asyncio client per event loop) or pass your own `client` (``redis.Redis``) and
    `async_client` (``redis.asyncio.Redis``); with your own clients, set their
    ``socket_timeout`` yourself, since `op_timeout` cannot be applied to them. Without an
    async client, the async methods use the sync client (blocking for at most one op).
    """

    shared = True

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        async_client: Any = None,
        prefix: str = "rag_resilience",
        op_timeout: float = 0.05,
        retry_interval: float = 1.0,
        max_connections: int = 64,
        view_ttl: float | None = 0.1,
    ) -> None:
        if url is None and client is None and async_client is None:
            raise ValueError("RedisStore needs url= or client= (and/or async_client=)")
        _v.positive("op_timeout", op_timeout)
        _v.at_least("retry_interval", retry_interval, 0)
        _v.integer("max_connections", max_connections, 1)
        _v.positive("view_ttl", view_ttl, none_ok=True)
        if not prefix:
            raise ValueError("prefix must be a non-empty string")
        redis = _import_redis()
        self._redis = redis
        self._no_script: type[Exception] = redis.exceptions.NoScriptError
        # Any Redis-side failure is a fault: the caller's request must not fail on it.
        # Our own errors (non-JSON values, exceptions raised by `fn`) still propagate.
        self._faults: tuple[type[BaseException], ...] = (
            redis.exceptions.RedisError,
            OSError,
            asyncio.TimeoutError,
        )
        self.url = url
        self.prefix = prefix
        self.op_timeout = float(op_timeout)
        self.retry_interval = float(retry_interval)
        self.max_connections = max_connections
        self.view_ttl = view_ttl
        # The local view of kv values (`get`): key -> (fresh until, monotonic; value).
        # One read per key per view_ttl goes to Redis (single flight: concurrent readers
        # of an expired entry keep the old value while one refreshes it).
        # Only values Redis answered are viewed (never local fallback state), and never
        # keys this store wrote with a TTL (their expiry must be seen at once).
        self._view: dict[str, tuple[float, Any]] = {}
        self._refreshing: set[str] = set()
        self._ttl_keys: set[str] = set()
        self._owns_client = client is None and url is not None
        self._client: Any = client if client is not None else None
        if self._client is None and url is not None:
            # Waiting for a pooled connection is load, not an outage: bounded by op_timeout
            # and served locally (counters["busy"]) when it runs out.
            pool = redis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=self.op_timeout,
                **self._client_options(sync=True),
            )
            self._client = redis.Redis(connection_pool=pool)
        self._async_client: Any = async_client
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        self._health = Failover("redis", self, self.retry_interval, probe=self._probe_back)
        self._checker: Any = None  # one dedicated connection for stall checks
        self._flushing = False
        self._ranks: dict[str, int] = {}  # waiter token -> its queue position (last ask)
        self._local = self._health.local
        self._lock = threading.Lock()
        self._warned_no_sync = False
        self._time_offset: float | None = None  # Redis TIME - time.monotonic()
        self._time_checked = -math.inf
        #: this process's id in notifications (stores/redis_notify.py ignores its own)
        self.sender_id = uuid.uuid4().hex
        # lease key -> (limit, lease_s, caller's now, monotonic then) of the last ask
        self._lease_params: dict[str, tuple[int, float, float, float]] = {}

    def __repr__(self) -> str:
        where = self.url if self.url is not None else "client"
        return f"RedisStore({where!r}, prefix={self.prefix!r})"

    def _client_options(self, *, sync: bool) -> dict[str, Any]:
        # One immediate retry on a connection error re-dials a pooled connection that a
        # Redis restart closed; timeouts are never retried, so a hung Redis costs one
        # op_timeout.
        retry_mod = self._redis.retry if sync else self._redis.asyncio.retry
        retry = retry_mod.Retry(
            self._redis.backoff.NoBackoff(), 1, (self._redis.exceptions.ConnectionError,)
        )
        options: dict[str, Any] = {
            "socket_timeout": self.op_timeout,
            "socket_connect_timeout": self.op_timeout,
            "retry": retry,
        }
        # No CLIENT SETINFO on connect: two round trips fewer for each connection a
        # recovering Redis must accept from every caller at once (redis-py >= 7).
        if "driver_info" in inspect.signature(self._redis.Connection.__init__).parameters:
            options["driver_info"] = None
        return options

    # -- health ----------------------------------------------------------------------
    @property
    def degraded(self) -> bool:
        """True while Redis is considered down and operations use local state."""
        return self._health.degraded

    @property
    def counters(self) -> dict[str, int]:
        """Snapshot: remote_ops, local_ops (served locally), faults, outages, recoveries,
        busy (pool exhausted: one op served locally, no outage), bad_values."""
        return self._health.snapshot()

    @property
    def last_error(self) -> BaseException | None:
        return self._health.last_error

    @property
    def local(self) -> MemoryStore:
        """The in-process store used while Redis is unreachable."""
        return self._local

    def _fault(self, exc: BaseException) -> bool:
        """Record a failed operation; True if it was load (pool exhausted, a first
        timeout), False if it was an outage."""
        if isinstance(exc, self._redis.exceptions.ConnectionError) and _POOL_EMPTY in str(exc):
            self._health.on_busy(exc)
            return True
        if isinstance(exc, (self._redis.exceptions.TimeoutError, asyncio.TimeoutError)):
            return self._health.on_timeout(exc, self._answers)
        self._health.on_fault(exc)
        return False

    def _answers(self) -> bool:
        """Whether Redis answers a PING within op_timeout on a connection of its own (not
        the pool a burst may have exhausted, not an event loop a burst may starve)."""
        if self.url is None:
            client = self._client
            if client is None:
                return False
        else:
            if self._checker is None:
                self._checker = self._redis.Redis.from_url(
                    self.url, single_connection_client=True, **self._client_options(sync=True)
                )
            client = self._checker
        try:
            return bool(client.ping())
        except self._faults:
            return False

    def _probe_back(self) -> bool:
        """The degraded store's background probe: a PING on the checker connection; when
        Redis answers, the releases the outage held back are sent at once."""
        alive = self._answers()
        if alive and self._health.pending and self._client is not None:
            self._flush(self._client)
        return alive

    def _wrongtype(self, exc: BaseException) -> bool:
        return isinstance(exc, self._redis.exceptions.ResponseError) and str(exc).startswith(
            "WRONGTYPE"
        )

    def server_time(self) -> float | None:
        """The Redis server's clock (seconds), shared by every replica: the one clock for
        shared deadlines. Measured with TIME at most every `_TIME_REFRESH_S` and kept as an
        offset from this process's monotonic clock; None if never measured."""
        now = time.monotonic()
        if now - self._time_checked >= _TIME_REFRESH_S and self._client is not None:
            self._time_checked = now  # one measurement per interval, even on failure
            if self._health.try_remote():
                try:
                    sent = time.monotonic()
                    secs, micros = self._client.time()
                    got = time.monotonic()
                except self._faults as exc:
                    self._fault(exc)
                else:
                    self._health.on_success()
                    self._time_offset = secs + micros / 1e6 - (sent + got) / 2
        offset = self._time_offset
        return None if offset is None else now + offset

    def _run(
        self,
        remote: Callable[[Any], T],
        local: Callable[[], T],
        keys: tuple[str, ...] = (),
        busy: Callable[[], T] | None = None,
    ) -> T:
        if self._client is None:
            self._no_sync_client()
            return local()
        if self._health.suspect:  # a timeout is being checked: do not pile onto it
            self._health.local_op()
            return busy() if busy is not None else local()
        if not self._health.try_remote():
            return local()
        client = self._client
        try:
            try:
                result = remote(client)
            except self._redis.exceptions.ResponseError as exc:
                if not keys or not self._wrongtype(exc):
                    raise
                self._repair(keys, exc)
                client.delete(*keys)
                result = remote(client)
        except _CallerError as wrapped:
            error: Exception = wrapped.error
        except self._faults as exc:
            if self._fault(exc) and busy is not None:
                return busy()
            return local()
        else:
            self._health.on_success()
            if self._health.pending:
                self._flush(client)
            return result
        self._health.on_success()  # Redis answered; the caller's fn raised
        raise error

    def _repair(self, keys: tuple[str, ...], exc: BaseException) -> None:
        for key in keys:
            self._health.bad_value(key, exc)

    def _flush(self, client: Any) -> None:
        """Send the lease releases an outage held back: in the background (a user call
        never waits for them), in pipelined batches (one round trip per batch)."""
        with self._lock:
            if self._flushing:
                return
            self._flushing = True
        threading.Thread(
            target=self._flush_now, args=(client,), name="redis-store-flush", daemon=True
        ).start()

    def _flush_now(self, client: Any) -> None:
        try:
            while True:
                pending = self._health.take_pending()
                if not pending:
                    return
                try:
                    sha = client.script_load(_LEASE_RELEASE)  # a restarted Redis lost it
                    for start in range(0, len(pending), _FLUSH_BATCH):
                        pipe = client.pipeline(transaction=False)
                        for key, token in pending[start : start + _FLUSH_BATCH]:
                            keys, args = self._release_call(key, token)
                            pipe.evalsha(sha, len(keys), *keys, *args)
                        pipe.execute()
                except self._faults as exc:
                    for key, token in pending:
                        self._health.defer_release(key, token)
                    if not self._fault(exc):
                        return  # an outage: the probe sends them when Redis is back
                    time.sleep(self.op_timeout)  # busy: try again shortly
        finally:
            with self._lock:
                self._flushing = False

    async def _aflush(self, client: Any) -> None:
        if self._client is not None:
            self._flush(self._client)
            return
        pending = self._health.take_pending()  # async client only: send them here
        script = _SCRIPTS["lease_release"]
        try:
            for key, token in pending:
                await script.acall(client, self._no_script, *self._release_call(key, token))
        except self._faults as exc:
            for key, token in pending:
                self._health.defer_release(key, token)
            self._fault(exc)

    def _no_sync_client(self) -> None:
        # Built with only an async client: sync calls cannot reach Redis. Misconfiguration,
        # but the caller's request must still not fail: serve locally, say so once.
        self._health.local_op()
        with self._lock:
            warned, self._warned_no_sync = self._warned_no_sync, True
        if not warned:
            logger.warning(
                "redis store %s has no sync client (built with async_client= only): sync "
                "calls use local in-process state; pass client= or url= to share them",
                self,
            )

    def _aclient(self) -> Any:
        """The async client for the running event loop (redis.asyncio clients are bound
        to the loop that opened their connections)."""
        if self._async_client is not None:
            return self._async_client
        if self.url is None:
            return None
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            with self._lock:
                client = self._async_clients.get(loop)
                if client is None:
                    # Half the op timeout to wait for a pooled connection: a full pool
                    # is load, reported as busy (ConnectionError), before the whole op's
                    # op_timeout bound (a timeout: checked as a possible stall) runs out.
                    pool = self._redis.asyncio.BlockingConnectionPool.from_url(
                        self.url,
                        max_connections=self.max_connections,
                        timeout=self.op_timeout / 2,
                        **self._client_options(sync=False),
                    )
                    client = self._redis.asyncio.Redis(connection_pool=pool)
                    self._async_clients[loop] = client
        return client

    async def _arun(
        self,
        remote: Callable[[Any], Awaitable[T]],
        sync_remote: Callable[[Any], T],
        local: Callable[[], T],
        keys: tuple[str, ...] = (),
        busy: Callable[[], T] | None = None,
    ) -> T:
        client = self._aclient()
        if client is None:
            return self._run(sync_remote, local, keys, busy)
        if self._health.suspect:  # a timeout is being checked: do not pile onto it
            self._health.local_op()
            return busy() if busy is not None else local()
        if not self._health.try_remote():
            return local()
        try:
            try:
                # One op timeout for the whole op, reconnect included (the socket
                # timeouts bound each connect and read separately).
                result = await asyncio.wait_for(remote(client), self.op_timeout)
            except self._redis.exceptions.ResponseError as exc:
                if not keys or not self._wrongtype(exc):
                    raise
                self._repair(keys, exc)
                await client.delete(*keys)
                result = await remote(client)
        except _CallerError as wrapped:
            error: Exception = wrapped.error
        except self._faults as exc:
            if self._fault(exc) and busy is not None:
                return busy()
            return local()
        else:
            self._health.on_success()
            if self._health.pending:
                await self._aflush(client)
            return result
        self._health.on_success()  # Redis answered; the caller's fn raised
        raise error

    # -- keys ------------------------------------------------------------------------
    def _kv_key(self, key: str) -> str:
        return f"{self.prefix}:kv:{key}"

    def _cache_keys(self, namespace: str, key: str = "") -> tuple[str, str, str, str]:
        base = f"{self.prefix}:cache:{{{namespace}}}"
        entry_prefix = f"{base}:e:"
        return entry_prefix + key, f"{base}:lru", f"{base}:seq", entry_prefix

    def _lease_key(self, key: str) -> str:
        return f"{self.prefix}:lease:{{{key}}}"

    def _release_call(
        self, k: str, token: str, forget: bool = True, key: str | None = None
    ) -> tuple[list[str], list[Any]]:
        """Lease zset `k` (as `_lease_key` built it) and token -> the release script's keys
        and args; the tombstone shares the zset's hash slot. With the limit's `key`, a
        freed permit is handed to the oldest waiter (see `_LEASE_RELEASE`), on the limit
        and lease time last asked for, at the caller's `now` as last seen plus the time
        since (callers' clocks may be fake)."""
        ms = _ms(_LEASE_GC_GRACE_S) if forget else 0
        keys = [k, f"{k}:gone:{token}", f"{k}:q", f"{k}:hb"]
        params = None if key is None else self._lease_params.get(k)
        if key is None:
            return keys, [token, ms, "", self.sender_id, "", "", "", 0]
        if params is None:
            return keys, [token, ms, self.channel(key), self.sender_id, "", "", "", 0]
        limit, lease_s, seen_now, seen_at = params
        now = seen_now + (time.monotonic() - seen_at)
        handoff = [_num(now), _num(now + lease_s), _num(now - _WAITER_GONE_S), limit]
        return keys, [token, ms, self.channel(key), self.sender_id, *handoff]

    def _handed(self, key: str, reply: Any) -> None:
        """The release script handed the permit to a waiter: if it is one of this
        process's, its limit admits it now (the pub/sub copy of a process's own message
        is ignored)."""
        if reply is None or isinstance(reply, int):
            return
        notifier = getattr(self, "_rag_resilience_notifier", None)
        if notifier is not None:
            notifier.deliver(key, "granted:" + _text(reply))  # type: ignore[operator]

    # -- key/value -------------------------------------------------------------------
    def _value(self, key: str, raw: Any) -> Any:
        """The JSON value of a reply; an unreadable one is logged once and read as absent.
        Every value read is mirrored locally: an op that must fall back starts from it."""
        value = self._decode(key, raw)
        if value is None:
            self._local.delete(key)
        else:
            self._local.set(key, value)
        return value

    def _decode(self, key: str, raw: Any) -> Any:
        if raw is None or raw is False:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
            self._health.bad_value(self._kv_key(key), exc)
            return None

    def _viewed(self, key: str) -> tuple[bool, Any]:
        """(True, value) if `get` may answer from the local view; else (False, None) and
        the caller must read Redis (it is then this key's single refresher)."""
        if self.view_ttl is None or key in self._ttl_keys:
            return False, None
        hit = self._view.get(key)
        if hit is not None and time.monotonic() < hit[0]:
            return True, hit[1]
        with self._lock:
            if key in self._refreshing and hit is not None:
                return True, hit[1]  # another caller is refreshing it: the old view stands
            self._refreshing.add(key)
        return False, None

    def _seen(self, key: str, value: Any, remote: bool) -> Any:
        if self.view_ttl is not None:
            with self._lock:
                self._refreshing.discard(key)
                if remote:
                    self._view[key] = (time.monotonic() + self.view_ttl, value)
        return value

    def _unview(self, key: str, ttl: float | None = None) -> None:
        """A write through this store: the next `get` reads Redis."""
        if ttl is not None and self.view_ttl is not None:
            with self._lock:
                if len(self._ttl_keys) < 100_000:
                    self._ttl_keys.add(key)
        if self._view:
            self._view.pop(key, None)

    def get(self, key: str) -> JSON | None:
        """The value at `key`, from a local view at most `view_ttl` old (written through
        by this store's own writes), so a shared breaker's closed-path check costs one
        Redis read per process per `view_ttl`, not one per call."""
        viewed, value = self._viewed(key)
        if viewed:
            return value
        k = self._kv_key(key)
        answered: list[bool] = []

        def remote(c: Any) -> Any:
            value = self._value(key, c.get(k))
            answered.append(True)
            return value

        try:
            value = self._run(remote, lambda: self._local.get(key), (k,))
        except BaseException:
            self._refreshing.discard(key)
            raise
        return self._seen(key, value, bool(answered))

    async def aget(self, key: str) -> JSON | None:
        viewed, value = self._viewed(key)
        if viewed:
            return value
        k = self._kv_key(key)
        answered: list[bool] = []

        async def remote(c: Any) -> Any:
            value = self._value(key, await c.get(k))
            answered.append(True)
            return value

        def sync_remote(c: Any) -> Any:
            value = self._value(key, c.get(k))
            answered.append(True)
            return value

        try:
            value = await self._arun(remote, sync_remote, lambda: self._local.get(key), (k,))
        except BaseException:
            self._refreshing.discard(key)
            raise
        return self._seen(key, value, bool(answered))

    def _set_args(self, key: str, value: JSON, ttl: float | None) -> tuple[str, str, int | None]:
        text = dumps(value)
        return self._kv_key(key), text, None if ttl is None else _ms(ttl) if ttl > 0 else 0

    def set(self, key: str, value: JSON, ttl: float | None = None) -> None:
        k, text, px = self._set_args(key, value, ttl)
        self._unview(key, ttl)

        def remote(c: Any) -> None:
            if px == 0:  # already expired
                c.delete(k)
            else:
                c.set(k, text, px=px)

        self._run(remote, lambda: self._local.set(key, value, ttl))

    async def aset(self, key: str, value: JSON, ttl: float | None = None) -> None:
        k, text, px = self._set_args(key, value, ttl)
        self._unview(key, ttl)

        async def remote(c: Any) -> None:
            if px == 0:
                await c.delete(k)
            else:
                await c.set(k, text, px=px)

        def sync_remote(c: Any) -> None:
            if px == 0:
                c.delete(k)
            else:
                c.set(k, text, px=px)

        await self._arun(remote, sync_remote, lambda: self._local.set(key, value, ttl))

    def delete(self, key: str) -> None:
        k = self._kv_key(key)
        self._unview(key)
        self._run(lambda c: c.delete(k), lambda: self._local.delete(key))

    async def adelete(self, key: str) -> None:
        k = self._kv_key(key)
        self._unview(key)

        async def remote(c: Any) -> Any:
            return await c.delete(k)

        await self._arun(remote, lambda c: c.delete(k), lambda: self._local.delete(key))

    def _cas_step(
        self, key: str, fn: UpdateFn[R], ttl: float | None, raw: Any
    ) -> tuple[R, list[Any] | None]:
        """Run `fn` on the raw value read; the CAS args to send, or None if nothing changes.

        The CAS expects the raw bytes read, so an unreadable value (read as absent) is
        overwritten by the first write."""
        absent = raw is None or raw is False
        current = self._decode(key, raw)
        try:
            new, result = fn(current)
        except Exception as exc:  # the caller's error, even an OSError, is no Redis fault
            raise _CallerError(exc) from None
        new_text = None if new is None else dumps(new)
        self._unview(key, ttl)
        if new is None:
            self._local.delete(key)
        else:
            self._local.set(key, new)
        unchanged = (absent and new_text is None) or (
            current is not None and new_text is not None and _text(raw) == new_text
        )
        if unchanged and ttl is None:
            # Unchanged: the read is a consistent snapshot, so skip the write entirely.
            return result, None
        px = 0 if ttl is None else _ms(ttl) if ttl > 0 else 1
        args = [
            "1" if absent else "0",
            b"" if absent else raw,
            "1" if new_text is None else "0",
            new_text or "",
            px,
        ]
        return result, args

    def update(self, key: str, fn: UpdateFn[R], ttl: float | None = None) -> R:
        k = self._kv_key(key)
        cas = _SCRIPTS["cas"]

        def remote(c: Any) -> R:
            raw = c.get(k)
            for _ in range(_MAX_CAS_ATTEMPTS):
                result, args = self._cas_step(key, fn, ttl, raw)
                if args is None:
                    return result
                reply = cas(c, self._no_script, [k], args)
                if int(reply[0]) == 1:
                    return result
                raw = reply[1] if len(reply) > 1 else None
            raise RuntimeError(f"update of {key!r} kept conflicting; gave up")

        return self._run(remote, lambda: self._local.update(key, fn, ttl), (k,))

    async def aupdate(self, key: str, fn: UpdateFn[R], ttl: float | None = None) -> R:
        if self._aclient() is None:
            return self.update(key, fn, ttl)
        k = self._kv_key(key)
        cas = _SCRIPTS["cas"]

        async def remote(c: Any) -> R:
            raw = await c.get(k)
            for _ in range(_MAX_CAS_ATTEMPTS):
                result, args = self._cas_step(key, fn, ttl, raw)
                if args is None:
                    return result
                reply = await cas.acall(c, self._no_script, [k], args)
                if int(reply[0]) == 1:
                    return result
                raw = reply[1] if len(reply) > 1 else None
            raise RuntimeError(f"update of {key!r} kept conflicting; gave up")

        def unused(c: Any) -> R:  # pragma: no cover - the async client exists here
            raise AssertionError

        return await self._arun(remote, unused, lambda: self._local.update(key, fn, ttl), (k,))

    # -- bounded cache ---------------------------------------------------------------
    def _script(self, name: str, keys: list[str], args: list[Any]) -> Callable[[Any], Any]:
        script = _SCRIPTS[name]
        return lambda c: script(c, self._no_script, keys, args)

    def _ascript(
        self, name: str, keys: list[str], args: list[Any]
    ) -> Callable[[Any], Awaitable[Any]]:
        script = _SCRIPTS[name]
        return lambda c: script.acall(c, self._no_script, keys, args)

    def _cache_get_call(self, namespace: str, key: str, now: float) -> tuple[list[str], list[Any]]:
        entry, lru, seq, _ = self._cache_keys(namespace, key)
        return [entry, lru, seq], [key, _num(now)]

    def cache_get(self, namespace: str, key: str, now: float) -> tuple[JSON, float] | None:
        keys, args = self._cache_get_call(namespace, key, now)
        run = self._script("cache_get", keys, args)
        return self._run(
            lambda c: self._cache_reply(keys[0], run(c)),
            lambda: self._local.cache_get(namespace, key, now),
            tuple(keys),
        )

    async def acache_get(self, namespace: str, key: str, now: float) -> tuple[JSON, float] | None:
        keys, args = self._cache_get_call(namespace, key, now)
        arun = self._ascript("cache_get", keys, args)
        run = self._script("cache_get", keys, args)

        async def remote(c: Any) -> tuple[JSON, float] | None:
            return self._cache_reply(keys[0], await arun(c))

        return await self._arun(
            remote,
            lambda c: self._cache_reply(keys[0], run(c)),
            lambda: self._local.cache_get(namespace, key, now),
            tuple(keys),
        )

    def _cache_set_call(
        self,
        namespace: str,
        key: str,
        value: JSON,
        stored_at: float,
        ttl: float | None,
        max_entries: int | None,
    ) -> tuple[list[str], list[Any]]:
        text = dumps(value)
        entry, lru, seq, entry_prefix = self._cache_keys(namespace, key)
        expires = "" if ttl is None else _num(stored_at + ttl)
        # Native TTL is garbage collection only (callers' clocks may be fake); the
        # logical expiry `stored_at + ttl` is checked against `now` on every read.
        px = 0 if ttl is None else _ms(ttl) if ttl > 0 else 1
        limit = -1 if max_entries is None else max(0, int(max_entries))
        return [entry, lru, seq], [key, text, _num(stored_at), expires, px, limit, entry_prefix]

    def cache_set(
        self,
        namespace: str,
        key: str,
        value: JSON,
        *,
        stored_at: float,
        ttl: float | None,
        max_entries: int | None,
    ) -> None:
        keys, args = self._cache_set_call(namespace, key, value, stored_at, ttl, max_entries)
        self._run(
            self._script("cache_set", keys, args),
            lambda: self._local.cache_set(
                namespace, key, value, stored_at=stored_at, ttl=ttl, max_entries=max_entries
            ),
            tuple(keys),
        )

    async def acache_set(
        self,
        namespace: str,
        key: str,
        value: JSON,
        *,
        stored_at: float,
        ttl: float | None,
        max_entries: int | None,
    ) -> None:
        keys, args = self._cache_set_call(namespace, key, value, stored_at, ttl, max_entries)
        await self._arun(
            self._ascript("cache_set", keys, args),
            self._script("cache_set", keys, args),
            lambda: self._local.cache_set(
                namespace, key, value, stored_at=stored_at, ttl=ttl, max_entries=max_entries
            ),
            tuple(keys),
        )

    def cache_delete(self, namespace: str, key: str) -> None:
        entry, lru, _, _ = self._cache_keys(namespace, key)
        self._run(
            self._script("cache_delete", [entry, lru], [key]),
            lambda: self._local.cache_delete(namespace, key),
            (entry, lru),
        )

    async def acache_delete(self, namespace: str, key: str) -> None:
        """Async twin of `cache_delete` (not in the Store ABC)."""
        entry, lru, _, _ = self._cache_keys(namespace, key)
        await self._arun(
            self._ascript("cache_delete", [entry, lru], [key]),
            self._script("cache_delete", [entry, lru], [key]),
            lambda: self._local.cache_delete(namespace, key),
            (entry, lru),
        )

    def cache_clear(self, namespace: str) -> None:
        _, lru, seq, entry_prefix = self._cache_keys(namespace)
        self._run(
            self._script("cache_clear", [lru, seq], [entry_prefix]),
            lambda: self._local.cache_clear(namespace),
            (lru, seq),
        )

    async def acache_clear(self, namespace: str) -> None:
        """Async twin of `cache_clear` (not in the Store ABC)."""
        _, lru, seq, entry_prefix = self._cache_keys(namespace)
        await self._arun(
            self._ascript("cache_clear", [lru, seq], [entry_prefix]),
            self._script("cache_clear", [lru, seq], [entry_prefix]),
            lambda: self._local.cache_clear(namespace),
            (lru, seq),
        )

    def cache_len(self, namespace: str, now: float) -> int:
        _, lru, _, entry_prefix = self._cache_keys(namespace)
        run = self._script("cache_len", [lru], [_num(now), entry_prefix])
        return self._run(
            lambda c: int(run(c)), lambda: self._local.cache_len(namespace, now), (lru,)
        )

    async def acache_len(self, namespace: str, now: float) -> int:
        """Async twin of `cache_len` (not in the Store ABC)."""
        _, lru, _, entry_prefix = self._cache_keys(namespace)
        args = [_num(now), entry_prefix]
        arun = self._ascript("cache_len", [lru], args)
        run = self._script("cache_len", [lru], args)

        async def remote(c: Any) -> int:
            return int(await arun(c))

        return await self._arun(
            remote, lambda c: int(run(c)), lambda: self._local.cache_len(namespace, now), (lru,)
        )

    # -- leases ----------------------------------------------------------------------
    def _lease_args(
        self, key: str, token: str, limit: int, lease_s: float, now: float, wait: bool = False
    ) -> tuple[list[str], list[Any]]:
        gc_ms = _ms(max(lease_s, 0.0) + _LEASE_GC_GRACE_S)
        k = self._lease_key(key)
        if len(self._lease_params) < 10_000 or k in self._lease_params:
            self._lease_params[k] = (int(limit), float(lease_s), float(now), time.monotonic())
        keys = [k, f"{k}:gone:{token}", f"{k}:q", f"{k}:hb", f"{k}:seq"]
        args = [token, int(limit), _num(now + lease_s), _num(now), gc_ms]
        return keys, [*args, "1" if wait else "0", _num(now - _WAITER_GONE_S)]

    def lease_wait(self, key: str, token: str, limit: int, lease_s: float, now: float) -> bool:
        keys, args = self._lease_args(key, token, limit, lease_s, now, wait=True)
        return self._lease_call(key, token, limit, lease_s, now, keys, args, wait=True)

    async def alease_wait(
        self, key: str, token: str, limit: int, lease_s: float, now: float
    ) -> bool:
        keys, args = self._lease_args(key, token, limit, lease_s, now, wait=True)
        return await self._alease_call(key, token, limit, lease_s, now, keys, args, wait=True)

    def lease_acquire(self, key: str, token: str, limit: int, lease_s: float, now: float) -> bool:
        keys, args = self._lease_args(key, token, limit, lease_s, now)
        return self._lease_call(key, token, limit, lease_s, now, keys, args)

    async def alease_acquire(
        self, key: str, token: str, limit: int, lease_s: float, now: float
    ) -> bool:
        keys, args = self._lease_args(key, token, limit, lease_s, now)
        return await self._alease_call(key, token, limit, lease_s, now, keys, args)

    def _lease_call(
        self,
        key: str,
        token: str,
        limit: int,
        lease_s: float,
        now: float,
        keys: list[str],
        args: list[Any],
        wait: bool = False,
    ) -> bool:
        run = self._script("lease_acquire", keys, args)
        local = self._local.lease_wait if wait else self._local.lease_acquire
        return self._run(
            lambda c: self._granted(token, run(c)),
            lambda: self._unanswered(token, local(key, token, limit, lease_s, now)),
            tuple(keys),
            lambda: self._not_granted(keys[0], token, wait),
        )

    async def _alease_call(
        self,
        key: str,
        token: str,
        limit: int,
        lease_s: float,
        now: float,
        keys: list[str],
        args: list[Any],
        wait: bool = False,
    ) -> bool:
        arun = self._ascript("lease_acquire", keys, args)
        local = self._local.lease_wait if wait else self._local.lease_acquire
        run = self._script("lease_acquire", keys, args)

        async def remote(c: Any) -> bool:
            return self._granted(token, await arun(c))

        return await self._arun(
            remote,
            lambda c: self._granted(token, run(c)),
            lambda: self._unanswered(token, local(key, token, limit, lease_s, now)),
            tuple(keys),
            lambda: self._not_granted(keys[0], token, wait),
        )

    def _granted(self, token: str, reply: Any) -> bool:
        """The lease script's reply: 1 granted, 0 refused, -1 - rank queued at `rank`."""
        code = int(reply)
        if code < 0 and len(self._ranks) < 10_000:
            self._ranks[token] = -1 - code
        return code == 1

    def _unanswered(self, token: str, granted: bool) -> bool:
        """A lease ask Redis did not answer because the store is down or a stall is being
        checked (served locally, no Redis op spent on it): a waiter asks again soon, so it
        is served as soon as the store has a verdict. A full pool is load: the waiter backs
        off as usual (asking sooner would only crowd the pool more)."""
        health = self._health
        if not granted and (health.suspect or health.degraded) and len(self._ranks) < 10_000:
            self._ranks[token] = 0
        return granted

    def _not_granted(self, k: str, token: str, wait: bool) -> bool:
        """A lease request Redis was too busy to answer: not granted, the caller waits and
        asks again (a local grant here would let a burst exceed the shared limit). The
        script may still run in Redis: a one-shot ask's token is forgotten (released with
        a tombstone once Redis answers), so its late grant cannot hold a permit for
        `lease_s`; a waiter keeps its token and asks again (a late grant is then its own)."""
        if not wait:
            self._defer(k, token)
        return self._unanswered(token, False)

    def _defer(self, k: str, token: str) -> None:
        """A release Redis could not take now: kept, and sent in the background at once
        if Redis is up (busy), else when it is back. Nothing else may follow to trigger
        it: the last releases of a burst must not hold permits for `lease_s`."""
        self._health.defer_release(k, token)
        if self._client is not None and not self._health.degraded:
            self._flush(self._client)

    def waiter_rank(self, token: str) -> int | None:
        """Position of waiter `token` in the queue at its last ask (0 = next), if queued."""
        return self._ranks.pop(token, None)

    # A release goes to both places: the lease may have been granted by Redis (even by a
    # script whose reply timed out) or by the local fallback. One that cannot reach Redis
    # now is sent on the first successful operation (see Failover.pending).
    def lease_release(self, key: str, token: str) -> None:
        self._release(key, token, forget=False)

    def lease_forget(self, key: str, token: str) -> None:
        self._release(key, token, forget=True)

    async def alease_release(self, key: str, token: str) -> None:
        await self._arelease(key, token, forget=False)

    async def alease_forget(self, key: str, token: str) -> None:
        await self._arelease(key, token, forget=True)

    def _release(self, key: str, token: str, forget: bool) -> None:
        k = self._lease_key(key)
        self._local.lease_release(key, token)
        keys, args = self._release_call(k, token, forget, key)
        reply = self._run(
            self._script("lease_release", keys, args),
            lambda: self._defer(k, token),
            tuple(keys),
        )
        self._handed(key, reply)

    async def _arelease(self, key: str, token: str, forget: bool) -> None:
        k = self._lease_key(key)
        self._local.lease_release(key, token)
        keys, args = self._release_call(k, token, forget, key)
        reply = await self._arun(
            self._ascript("lease_release", keys, args),
            self._script("lease_release", keys, args),
            lambda: self._defer(k, token),
            tuple(keys),
        )
        self._handed(key, reply)

    def lease_count(self, key: str, now: float) -> int:
        k, low = self._lease_key(key), "(" + _num(now)
        return self._run(
            lambda c: int(c.zcount(k, low, "+inf")),
            lambda: self._local.lease_count(key, now),
            (k,),
        )

    async def alease_count(self, key: str, now: float) -> int:
        """Async twin of `lease_count` (not in the Store ABC)."""
        k, low = self._lease_key(key), "(" + _num(now)

        async def remote(c: Any) -> int:
            return int(await c.zcount(k, low, "+inf"))

        return await self._arun(
            remote,
            lambda c: int(c.zcount(k, low, "+inf")),
            lambda: self._local.lease_count(key, now),
            (k,),
        )

    def _cache_reply(self, entry: str, reply: Any) -> tuple[JSON, float] | None:
        if not reply:
            return None
        try:
            value, stored_at = reply
            return json.loads(value), float(stored_at)
        except (ValueError, TypeError) as exc:  # an unreadable entry is a miss
            self._health.bad_value(entry, exc)
            return None

    # -- notifications (stores/redis_notify.py) ---------------------------------------
    def channel(self, key: str) -> str:
        """The pub/sub channel of notifications about `key` (breaker verdicts)."""
        return f"{self.prefix}:notify:{key}"

    def publish(self, key: str, message: str) -> None:
        """Publish `message` on `key`'s channel; a Redis fault is a lost notification
        (waiters re-read the state within their poll interval), never an error."""
        if self._client is None or not self._health.try_remote():
            return
        try:
            self._client.publish(self.channel(key), message)
        except self._faults as exc:
            self._fault(exc)

    def subscriber_client(self) -> Any:
        """A new sync client for a pub/sub listener: reads block (no `op_timeout`), so it
        must never be one of the call path's clients. None without a URL or client."""
        if self.url is not None:
            return self._redis.Redis.from_url(self.url, socket_connect_timeout=1.0)
        if self._client is not None:
            # the same connection settings through a pool of its own (connection_kwargs
            # may hold keys that `Redis()` itself does not take)
            pool = self._client.connection_pool
            kwargs = dict(pool.connection_kwargs)
            kwargs["socket_timeout"] = None
            own = self._redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
            return self._redis.Redis(connection_pool=own)
        return None

    # -- lifecycle -------------------------------------------------------------------
    def ping(self) -> bool:
        """True if Redis answers now (does not change degraded state)."""
        if self._client is None:
            return False
        try:
            return bool(self._client.ping())
        except self._faults:
            return False

    def close(self) -> None:
        """Close the clients this store built (clients passed in belong to the caller)."""
        if self._owns_client and self._client is not None:
            self._client.close()
        if self._checker is not None:
            self._checker.close()
        self._async_clients = weakref.WeakKeyDictionary()

    async def aclose(self) -> None:
        """Close this loop's async client and the sync client this store built."""
        client = self._async_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
        self.close()
