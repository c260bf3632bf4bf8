"""Error helpers every layer shares (the guest agent, which stands alone, keeps its own)."""

from __future__ import annotations


def first_leaf(error: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups: what a nursery that failed is
    reported by (a failed job's reason, a sandbox's end, the CLI's message); `error` itself
    when it is no group."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error
