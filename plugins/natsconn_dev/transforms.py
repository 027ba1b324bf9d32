"""Small built-in transforms: subject mapping and JSON validation."""

from __future__ import annotations

import json

from pydantic import Field

from connector import (
    AddressTemplate,
    Message,
    PluginConfig,
    RejectedError,
    TemplateStr,
    Transform,
)


class MapSubjectConfig(PluginConfig):
    subject: TemplateStr = Field(description="address template, e.g. 'archive.{subject[1]}'")


class MapSubject(Transform[MapSubjectConfig]):
    """Rewrites each message's subject from a template of its tokens and headers."""

    Config = MapSubjectConfig

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._template = AddressTemplate(self.config.subject)

    def process_one(self, message: Message) -> Message:
        return Message(message.data, self._template.render(message), message.key,
                       message.headers, message.timestamp, message.id)


class JsonValidateConfig(PluginConfig):
    require: list[str] = Field(default_factory=list,
                               description="top-level keys that must be present")


class JsonValidate(Transform[JsonValidateConfig]):
    """Rejects messages whose data is not a JSON object (with the required keys)."""

    Config = JsonValidateConfig

    def process_one(self, message: Message) -> Message:
        try:
            value = json.loads(message.data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RejectedError(f"data is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise RejectedError(f"expected a JSON object, found {type(value).__name__}")
        missing = [k for k in self.config.require if k not in value]
        if missing:
            raise RejectedError(f"JSON object lacks required key(s): {', '.join(missing)}")
        return message
