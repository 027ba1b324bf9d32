"""Messages a core NATS publish left queued on a connection that stalled.

When a flush times out but the connection stays up, the batch's bytes are
still queued in the client and the socket, ahead of anything written later,
and reach the server when it reads again. The retry of that batch must not
publish them again (each would arrive twice, and the client's buffer would
grow by a batch per retry round); it only needs a flush that comes back.

:class:`QueuedWrites` keeps that knowledge per message. A message is *queued*
from the timed-out attempt until a later flush on the same connection comes
back, then *delivered* until its own retry takes note of it. A reconnect
forgets the queued ones (what went to the lost connection may be gone) and
keeps the delivered ones. An entry goes when its message is garbage-collected,
so a batch the engine gives up on leaves nothing behind.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Sequence

from connector import Message

_DELIVERED = 0  # the write number of an entry whose bytes reached the server


class _Entry:
    __slots__ = ("ref", "write")

    def __init__(self, ref: weakref.ref[Message], write: int) -> None:
        self.ref = ref
        self.write = write  # the write that queued it, or _DELIVERED


class QueuedWrites:
    """Per message: queued on the current connection, or already delivered."""

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def held(self, message: Message) -> bool:
        """True when ``message`` needs no new publish: an earlier attempt's bytes
        are queued on this connection or reached the server."""
        entry = self._entries.get(id(message))
        return entry is not None and entry.ref() is message

    def timed_out(self, messages: Sequence[Message], write: int,
                  skip: Collection[int] = ()) -> None:
        """The flush after write number ``write`` timed out on a connection that
        is still up: every message of it (but the indexes in ``skip``, which were
        not published) is queued, unless already known."""
        entries = self._entries
        for i, m in enumerate(messages):
            key = id(m)
            if i in skip or key in entries:
                continue
            entries[key] = _Entry(weakref.ref(m, self._forget_callback(key)), write)

    def flushed(self, messages: Sequence[Message], write: int) -> None:
        """The flush after write number ``write`` came back: ``messages`` are
        written, and everything queued by earlier writes reached the server."""
        entries = self._entries
        if not entries:
            return
        for m in messages:
            entries.pop(id(m), None)
        for entry in entries.values():
            if entry.write <= write:
                entry.write = _DELIVERED

    def connection_lost(self) -> None:
        """Bytes queued for a lost connection may be gone: forget them."""
        entries = self._entries
        for key in [k for k, e in entries.items() if e.write != _DELIVERED]:
            del entries[key]

    def _forget_callback(self, key: int) -> Callable[[weakref.ref[Message]], None]:
        entries = self._entries

        def forget(ref: weakref.ref[Message]) -> None:
            entry = entries.get(key)
            if entry is not None and entry.ref is ref:
                del entries[key]

        return forget
