"""Key templates of the Redis sinks: address templates with doubled braces for
Redis Cluster hash tags."""

from __future__ import annotations

import pytest
from natsconn_redis.keys import KeyTemplate

from connector import ConfigError, Message


def render(text: str, subject: str = "orders.eu", key: bytes | None = b"k1") -> str:
    return KeyTemplate(text).render(Message(b"x", subject, key=key, id="m1"))


def test_placeholders_as_in_address_templates() -> None:
    assert render("s.{subject[-1]}") == "s.eu"
    assert render("{subject}:{key}:{id}") == "orders.eu:k1:m1"
    assert render("plain") == "plain"


def test_doubled_braces_are_a_hash_tag() -> None:
    assert render("{{orders}}:{subject[1]}") == "{orders}:eu"
    assert render("{{{subject[1]}}}:jobs") == "{eu}:jobs"
    assert render("{{it}}") == "{it}"


@pytest.mark.parametrize("text", ["{orders}", "a}b", "{subject", "{{x}"])
def test_bad_templates_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        KeyTemplate(text)
