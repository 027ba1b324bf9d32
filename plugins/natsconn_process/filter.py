"""``filter``: keep the messages for which a CEL condition is true."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from connector import (
    Bindings,
    Condition,
    ExpressionFailed,
    Message,
    PluginConfig,
    Rejected,
    Transform,
)

from ._plan import hint


class FilterConfig(PluginConfig):
    when: Condition = Field(description="CEL condition; messages for which it is true are kept, "
                                        "e.g. 'data.amount > 10'")
    on_error: Literal["reject", "drop", "keep"] = Field(
        "reject", description="when the condition fails on a message (a missing field, a value "
        "of the wrong type): reject it to the dead letter with the reason, drop it (acked and "
        "counted as filtered), or keep it")


class Filter(Transform[FilterConfig]):
    """Keeps messages for which a CEL condition is true; drops the rest (acked, counted)."""

    Config = FilterConfig

    def process(self, messages: list[Message]) -> Sequence[Message | Rejected]:
        when = self.config.when
        test = when.test
        out: list[Message | Rejected] = []
        append = out.append
        dropped = 0
        for message in messages:
            try:
                if test(message):
                    append(message)
                else:
                    dropped += 1
            except ExpressionFailed as exc:
                on_error = self.config.on_error
                if on_error == "reject":
                    append(Rejected(message, f"filter: {exc}{hint(when, Bindings(message))}"))
                elif on_error == "keep":
                    append(message)
                else:
                    dropped += 1
        if dropped:
            self.context.meters.filtered(dropped)
        return out
