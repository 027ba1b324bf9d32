"""Address templates: constants, subject tokens, headers, key and id."""

from __future__ import annotations

import pytest

from connector import AddressTemplate, ConfigError, Message, RejectedError

MSG = Message(b"x", "orders.eu.created", key=b"k-42", headers={"Tenant": "acme"}, id="S:7")


@pytest.mark.parametrize(("template", "address"), [
    ("archive", "archive"),
    ("{subject}", "orders.eu.created"),
    ("copy.{subject}", "copy.orders.eu.created"),
    ("orders.{subject[1]}", "orders.eu"),
    ("{subject[0]}", "orders"),
    ("last.{subject[-1]}", "last.created"),
    ("{subject[-3]}", "orders"),
    ("{header[Tenant]}.events", "acme.events"),
    ("by-key.{key}", "by-key.k-42"),
    ("dedupe.{id}", "dedupe.S:7"),
    ("{ subject[1] }.{header[Tenant]}.{key}", "eu.acme.k-42"),
])
def test_render(template: str, address: str) -> None:
    assert AddressTemplate(template).render(MSG) == address


def test_constant_templates_are_marked_constant() -> None:
    assert AddressTemplate("archive.all").is_constant
    assert not AddressTemplate("archive.{subject[1]}").is_constant


@pytest.mark.parametrize(("template", "message", "reason"), [
    ("{subject[3]}", MSG, "no token 3"),
    ("{subject[-4]}", MSG, "no token -4"),
    ("{subject}", Message(b"x"), "no subject"),
    ("{subject[0]}", Message(b"x"), "no subject"),
    ("{header[Region]}", MSG, "'Region'"),
    ("{key}", Message(b"x", "a"), "no key"),
    ("{id}", Message(b"x", "a"), "no id"),
    # bad bytes replaced would send different keys to one address: refused instead
    ("k.{key}", Message(b"x", "a", key=b"ab\xff\xfe"), r"key is not valid UTF-8 \(byte 2 of 4"),
])
def test_missing_parts_reject_the_message(template: str, message: Message, reason: str) -> None:
    with pytest.raises(RejectedError, match=reason):
        AddressTemplate(template).render(message)


@pytest.mark.parametrize(("template", "reason"), [
    ("{topic}", "unknown placeholder"),
    ("{}", "unknown placeholder"),
    ("{subject[one]}", "expected a token number"),
    ("{header}", "needs a name"),
    ("{key[0]}", "takes no index"),
    ("orders.{subject[1]", "unbalanced braces"),
    ("orders.subject[1]}", "unbalanced braces"),
])
def test_bad_templates_are_config_errors(template: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason) as info:
        AddressTemplate(template)
    assert template in str(info.value)
