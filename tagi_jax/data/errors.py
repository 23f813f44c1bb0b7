"""``DataError``: bad training or evaluation data, as one line naming the file and the problem.

Kept free of TensorFlow and SeqIO so that training, evaluation and the CLIs can import and
catch it cheaply. A ``ValueError``, so ``python -m tagi_jax.train`` reports it as one ``error:``
line with exit status 2, like every other bad input.

Errors raised inside a ``tf.data`` generator reach the caller wrapped in a TensorFlow error
whose message carries the whole Python traceback. ``recorded`` remembers the original
exception where it is raised, and ``from_pipeline`` turns the TensorFlow error back into a
``DataError`` with the original message (read from the TensorFlow message when nothing was
recorded), so the boundary where batches are pulled can re-raise it ``from None``.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any


class DataError(ValueError):
    """Data that cannot be used; the message (always one line) names the file and the problem."""

    def __init__(self, message: object):
        # One line by construction: a message that quotes a multi-line source (a YAML or
        # TensorFlow error) still prints as the single ``error:`` line of the CLIs.
        lines = [line.strip() for line in str(message).splitlines()]
        super().__init__(" ".join(line for line in lines if line))


def found(value: Any, limit: int = 40) -> str:
    """What a wrong value is, for "expected X, found Y": its JSON-ish type and a short repr."""
    kinds = {
        str: "a string",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    kind = kinds.get(type(value), type(value).__name__)
    if value is None:
        return kind
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{kind} ({text})"


# --- errors raised inside tf.data generators --------------------------------------------------

_lock = threading.Lock()
# (type name, message, is a DataError) of the latest exception raised by a ``recorded``
# generator. tf.data runs generators on its own threads, so this is process-wide, not
# thread-local; ``from_pipeline`` only uses it when its message is the one TensorFlow reports,
# so a stale entry is never blamed for another error.
_last: tuple[str, str, bool] | None = None


def recorded(generate: Callable[..., Iterator]) -> Callable[..., Iterator]:
    """``generate`` (a generator function handed to ``tf.data``), remembering the exception it
    raises for ``from_pipeline``."""

    @functools.wraps(generate)
    def wrapper(*args, **kwargs):
        global _last
        try:
            yield from generate(*args, **kwargs)
        except Exception as e:
            with _lock:
                # what it said, not the exception: its traceback's frames stay collectable
                _last = (type(e).__name__, str(e), isinstance(e, DataError))
            raise

    return wrapper


# "{{function_node ...}} ValueError: <message>\nTraceback (most recent call last): ..."
_WRAPPED = re.compile(r"^(?:\{\{[^}]*\}\}\s*)?(?:[\w.]+(?:Error|Exception|Exit)): (.*?)\n", re.S)


def from_pipeline(error: Exception, context: str) -> DataError:
    """A ``DataError`` for ``error`` (a TensorFlow ``OpError`` raised while pulling batches):
    the original Python exception's message when TensorFlow wrapped one, else TensorFlow's own
    first line; ``context`` (the task being read) is added when the message does not already
    come from our own readers (a ``DataError``, which names its file)."""
    global _last
    message = getattr(error, "message", None) or str(error)
    with _lock:
        original, _last = _last, None
    if original is not None and original[1] and original[1] in message:
        kind, text, ours = original
        return DataError(text if ours else f"{context}: {kind}: {text}")
    match = _WRAPPED.match(message)
    if match:
        return DataError(f"{context}: {match.group(1)}")
    first = message.strip().splitlines()[0] if message.strip() else type(error).__name__
    return DataError(f"{context}: {first}")
