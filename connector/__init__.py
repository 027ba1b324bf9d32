"""natsconn's plugin SDK: everything a plugin package imports.

A plugin author reads this module top to bottom: the message, the batch and
its ack handle, the three plugin kinds, the errors, and a few helpers.
"""

from ._batch import NO_ACK, AckHandle, Batch, CallbackAck, NoAck
from ._buffer import PushBuffer
from ._context import Meters, NullMeters, PluginContext
from ._errors import (
    ConfigError,
    ConnectorError,
    EndOfInput,
    PartialWriteError,
    PluginLoadError,
    RejectedError,
    RetryableError,
)
from ._expr import (
    Bindings,
    Condition,
    Expr,
    Expression,
    ExpressionError,
    ExpressionFailed,
    parse_data,
)
from ._message import Message
from ._plugin import Plugin, PluginConfig, Rejected, Sink, Source, Transform
from ._template import AddressTemplate, TemplateStr
from ._units import ByteSize, Duration, parse_duration, parse_size

__version__ = "0.1.0"

__all__ = [
    "NO_ACK",
    "AckHandle",
    "AddressTemplate",
    "Batch",
    "Bindings",
    "ByteSize",
    "CallbackAck",
    "Condition",
    "ConfigError",
    "ConnectorError",
    "Duration",
    "EndOfInput",
    "Expr",
    "Expression",
    "ExpressionError",
    "ExpressionFailed",
    "Message",
    "Meters",
    "NoAck",
    "NullMeters",
    "PartialWriteError",
    "Plugin",
    "PluginConfig",
    "PluginContext",
    "PluginLoadError",
    "PushBuffer",
    "Rejected",
    "RejectedError",
    "RetryableError",
    "Sink",
    "Source",
    "TemplateStr",
    "Transform",
    "parse_data",
    "parse_duration",
    "parse_size",
]
