"""How ids become words of routing keys and Redis keys: one escaping rule, shared by the bus and the live state."""

from __future__ import annotations

_SAFE_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def escape_word(value: str | int) -> str:
    """One word of a routing key or Redis key: characters other than letters, digits, ``_``, ``-`` become ``%XX``.

    Topic keys split on ``.`` and treat ``*``/``#`` as wildcards, Redis keys here split on ``:`` and SCAN patterns use
    ``*?[]``, and run ids may contain dots and colons: escaping keeps one id one word, and the mapping is reversible
    (``%`` itself is escaped). Ordinary ids (``r0042``, ``live``) are unchanged.
    """
    text = str(value)
    if not text:
        raise ValueError("a routing-key word cannot be empty")
    return "".join(c if c in _SAFE_CHARACTERS else "".join(f"%{b:02X}" for b in c.encode()) for c in text)
