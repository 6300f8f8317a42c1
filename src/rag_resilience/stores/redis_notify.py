"""Cross-process probe verdicts over Redis pub/sub.

A breaker on a shared `RedisStore` publishes each probe report and state change on the
channel of its key. One daemon thread per store (per process) subscribes to the store's
notification channels and calls the local callbacks registered for a key, which wake that
process's probe-waiters: they learn a verdict of another process at once, without polling
Redis (they still re-read the state once a second, in case a message was lost).

Messages are JSON ``{"s": state, "from": sender}``; a process ignores its own (its local
waiters were woken directly). Stores without pub/sub (memory, SQLite) get no notifier:
their shared waiters re-read the state at short intervals instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Any

from .base import Store

__all__ = ["RedisNotifier", "notifier_for"]

logger = logging.getLogger("rag_resilience")

_ATTR = "_rag_resilience_notifier"
_GET_TIMEOUT_S = 1.0  # how often the listener checks that its notifier is still wanted
_RECONNECT_S = 1.0
_READY_TIMEOUT_S = 1.0


def notifier_for(
    store: Store | None, key: str, callback: Callable[[str], None]
) -> RedisNotifier | None:
    """The store's notifier with `callback(state)` registered for `key` (held weakly when
    it is a bound method), or None when the store has no pub/sub."""
    if store is None or not store.shared or not hasattr(store, "subscriber_client"):
        return None
    notifier: RedisNotifier | None = getattr(store, _ATTR, None)
    if notifier is None:
        with _create_lock:
            notifier = getattr(store, _ATTR, None)
            if notifier is None:
                notifier = RedisNotifier(store)
                setattr(store, _ATTR, notifier)
    notifier.register(key, callback)
    return notifier


_create_lock = threading.Lock()


class RedisNotifier:
    """Publishes and receives notifications for one `RedisStore`."""

    def __init__(self, store: Any) -> None:
        self.store = store
        # the store's own id when it has one: messages its Lua scripts publish (a freed
        # lease) are then recognised as this process's own
        self.sender = getattr(store, "sender_id", None) or uuid.uuid4().hex
        self.received = 0  # messages from other processes dispatched
        self._lock = threading.Lock()
        self._callbacks: dict[str, list[Callable[[], Callable[[str], None] | None]]] = {}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def register(self, key: str, callback: Callable[[str], None]) -> None:
        ref: Callable[[], Callable[[str], None] | None] = (
            weakref.WeakMethod(callback)  # type: ignore[arg-type]
            if hasattr(callback, "__self__")
            else _Strong(callback)
        )
        with self._lock:
            self._callbacks.setdefault(key, []).append(ref)
            start = self._thread is None
            if start:
                self._thread = threading.Thread(
                    target=_listen,
                    args=(weakref.ref(self), self.store.channel("*"), self._ready),
                    name=f"rag-resilience-notify-{self.store.prefix}",
                    daemon=True,
                )
        if start and self._thread is not None:
            self._thread.start()
            # the first waiter must not miss a verdict published while we subscribe
            self._ready.wait(_READY_TIMEOUT_S)

    def publish(self, key: str, state: str) -> None:
        self.store.publish(key, json.dumps({"s": state, "from": self.sender}))

    def dispatch(self, channel: str, data: Any) -> None:
        try:
            message = json.loads(data)
            state, sender = str(message["s"]), message.get("from")
        except (ValueError, TypeError, KeyError):
            return  # not ours: ignore
        if sender == self.sender:
            return
        prefix = self.store.channel("")
        self.deliver(channel[len(prefix) :] if channel.startswith(prefix) else channel, state)

    def deliver(self, key: str, state: str) -> None:
        """Call the callbacks registered for `key` with `state` (a message of another
        process, or this process's own news that skipped pub/sub)."""
        with self._lock:
            refs = list(self._callbacks.get(key, ()))
        for ref in refs:
            callback = ref()
            if callback is None:
                continue
            self.received += 1
            try:
                callback(state)
            except Exception:  # pragma: no cover - a callback bug never kills the listener
                logger.exception("probe-verdict callback raised")


class _Strong:
    """A strong reference with `weakref.ref`'s call shape."""

    __slots__ = ("target",)

    def __init__(self, target: Callable[[str], None]) -> None:
        self.target = target

    def __call__(self) -> Callable[[str], None]:
        return self.target


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _listen(
    ref: weakref.ReferenceType[RedisNotifier], pattern: str, ready: threading.Event
) -> None:
    """The listener thread: runs while its notifier is alive; reconnects after faults."""
    while True:
        notifier = ref()
        if notifier is None:
            return
        client = notifier.store.subscriber_client()
        del notifier
        if client is None:
            ready.set()
            return
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            pubsub.psubscribe(pattern)
            # the subscription is live once its confirmation arrives
            pubsub.get_message(ignore_subscribe_messages=False, timeout=_READY_TIMEOUT_S)
            ready.set()
            while True:
                message = pubsub.get_message(timeout=_GET_TIMEOUT_S)
                notifier = ref()
                if notifier is None:
                    pubsub.close()
                    client.close()
                    return
                if message is not None and message.get("type") == "pmessage":
                    notifier.dispatch(_text(message["channel"]), message["data"])
                del notifier
        except Exception as exc:  # Redis down: waiters fall back to re-reading the state
            ready.set()
            logger.debug("probe-verdict listener lost Redis (%s); reconnecting", exc)
            with contextlib.suppress(Exception):
                client.close()
            threading.Event().wait(_RECONNECT_S)
