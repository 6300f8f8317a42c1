"""The pacer's buckets in Redis: every process that paces the same upstream shares them.

Each bucket is one GCRA "theoretical arrival time" (a float of seconds on the Redis
server's clock, ``TIME``: one clock for every process and host). A reservation is one Lua
script, atomic across processes: it reads both buckets (requests and tokens), computes
the slot, refuses it if it comes after the caller's deadline, else moves both times on.
The rates and capacities come from each process's own learning (every process reads the
same headers); only the arrival times are shared. Adjustments learned from a response
(the server says less is left, a Retry-After, the tokens a response really used) are a
second script.

Fail-open as the stores are: every call goes through `RedisStore`'s fault handling (its
`op_timeout`, one warning per outage, a probe per `retry_interval`), and while Redis is
unreachable the pacer uses its local buckets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

__all__ = ["SharedBuckets"]

# KEYS: 1 requests TAT, 2 tokens TAT, 3 the last learned request interval (a process that
# has learned nothing yet is paced by what the others learned). ARGV: 1 req interval
# (0: unknown), 2 req capacity,
# 3 tok interval (0: none), 4 tok capacity, 5 tok cost, 6 max wait (-1: none),
# 7 not-before offset from now (seconds, a Retry-After). Returns {granted 0/1, wait}.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ri, rc = tonumber(ARGV[1]), tonumber(ARGV[2])
if ri > 0 then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', 600000)
else
  ri = tonumber(redis.call('GET', KEYS[3]) or '0')
  rc = 1
end
local ti, tc, cost = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local max_wait, not_before = tonumber(ARGV[6]), tonumber(ARGV[7])
local at = now + not_before
local rtat = tonumber(redis.call('GET', KEYS[1]) or '0')
local ttat = tonumber(redis.call('GET', KEYS[2]) or '0')
if ri > 0 then at = math.max(at, math.max(rtat, now) + (1 - rc) * ri) end
if ti > 0 and cost > 0 then at = math.max(at, math.max(ttat, now) + (cost - tc) * ti) end
local wait = at - now
if max_wait >= 0 and wait > max_wait then return {0, tostring(wait)} end
if ri > 0 then
  local v = math.max(rtat, at) + ri
  redis.call('SET', KEYS[1], tostring(v), 'PX', math.ceil((v - now + 60) * 1000))
end
if ti > 0 and cost > 0 then
  local v = math.max(ttat, at) + cost * ti
  redis.call('SET', KEYS[2], tostring(v), 'PX', math.ceil((v - now + 60) * 1000))
end
return {1, tostring(wait)}
"""

# KEYS: 1 the TAT. ARGV: 1 op ("atleast": TAT >= now + value; "add": TAT += value if set).
_ADJUST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local v = tonumber(ARGV[2])
local new
if ARGV[1] == 'atleast' then new = math.max(cur, now + v)
elseif cur > now then new = cur + v
else return 0 end
redis.call('SET', KEYS[1], tostring(new), 'PX', math.max(1, math.ceil((new - now + 60) * 1000)))
return 1
"""


class _Script:
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


_RESERVE_SCRIPT = _Script(_RESERVE)
_ADJUST_SCRIPT = _Script(_ADJUST)


class SharedBuckets:
    """A pacer's arrival times in a `RedisStore` (its client, prefix and fault handling)."""

    def __init__(self, store: Any, upstream: str) -> None:
        run = getattr(store, "_run", None)
        if not callable(run):
            raise ValueError("store must be a RedisStore (rate limits are shared through Redis)")
        self._run: Callable[..., Any] = run
        self._no_script: type[Exception] = store._redis.exceptions.NoScriptError
        tag = hashlib.blake2b(upstream.encode(), digest_size=8).hexdigest()
        base = f"{store.prefix}:rl:{{{tag}}}"
        self.keys = [f"{base}:req", f"{base}:tok", f"{base}:req_interval"]

    def reserve(
        self,
        req: tuple[float, float] | None,
        tok: tuple[float, float] | None,
        cost: int,
        max_wait: float | None,
        not_before: float,
    ) -> tuple[bool, float] | None:
        """(granted, wait) from Redis, or None when Redis is unreachable (go local).
        `req`/`tok`: (interval, capacity) of each bucket, None if unknown."""
        args = [
            repr(req[0]) if req else "0",
            repr(req[1]) if req else "0",
            repr(tok[0]) if tok else "0",
            repr(tok[1]) if tok else "0",
            str(cost),
            repr(max_wait) if max_wait is not None else "-1",
            repr(max(0.0, not_before)),
        ]

        def remote(client: Any) -> tuple[bool, float] | None:
            granted, wait = _RESERVE_SCRIPT(client, self._no_script, self.keys, args)
            return bool(int(granted)), float(wait)

        result: tuple[bool, float] | None = self._run(remote, lambda: None)
        return result

    def adjust(self, which: int, op: str, value: float) -> None:
        """`op` "atleast": the bucket's next free time is at least `value` s from now;
        "add": move it by `value` seconds. `which`: 0 requests, 1 tokens."""
        key = self.keys[which]

        def remote(client: Any) -> None:
            _ADJUST_SCRIPT(client, self._no_script, [key], [op, repr(value)])

        self._run(remote, lambda: None)
