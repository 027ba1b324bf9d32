"""connector's one expression module: CEL compiled and type-checked at load,
evaluated per message."""

from __future__ import annotations

import datetime

import pytest
from pydantic import ValidationError

from connector import (
    Bindings,
    Condition,
    Expr,
    Expression,
    ExpressionError,
    ExpressionFailed,
    Message,
    PluginConfig,
    RejectedError,
    parse_data,
)

ORDER = Message(b'{"amount": 12, "region": "eu", "items": [{"qty": 3}]}', "orders.eu.created",
                b"k-1", {"Region": "eu"}, 1_700_000_000.0, "ORDERS:7")


@pytest.mark.parametrize(("source", "column", "words"), [
    ("subject ==", 11, "Syntax error"),
    ("nope > 1", 1, "undeclared reference to 'nope'"),
    ("subject + 1 == 2", 9, "no matching overload for '_+_' applied to '(string, int)'"),
    ("size(tokens) == 'x'", 14, "'_==_' applied to '(int, string)'"),
    ("key == 'text'", 5, "'_==_' applied to '(bytes, string)'"),
])
def test_compile_errors_name_the_column(source: str, column: int, words: str) -> None:
    with pytest.raises(ExpressionError) as caught:
        Expression(source)
    assert words in caught.value.message
    assert (caught.value.line, caught.value.column) == (1, column)


def test_a_multi_line_expression_names_line_and_column() -> None:
    with pytest.raises(ExpressionError) as caught:
        Expression('subject.startsWith("a") &&\n  size(tokens) == "x"')
    assert (caught.value.line, caught.value.column) == (2, 16)


def test_the_result_type_is_checked_where_it_is_known() -> None:
    with pytest.raises(ExpressionError, match="giving a bool, found one giving int"):
        Expression("size(tokens)", result="bool")
    with pytest.raises(ExpressionError, match="giving a string, found one giving bool"):
        Expression("subject == 'a'", result="string")
    assert Expression("data.flag", result="bool").test(Message(b'{"flag": true}'))
    with pytest.raises(ExpressionFailed, match="gave int 3, expected true or false"):
        Expression("data.flag", result="bool").test(Message(b'{"flag": 3}'))
    with pytest.raises(ExpressionError, match="empty"):
        Expression("  ")


def test_variables_and_their_values() -> None:
    def value(source: str) -> object:
        return Expression(source).evaluate(ORDER)

    assert value("data.amount") == 12 and value("data.items[0].qty") == 3
    assert value("subject") == "orders.eu.created" and value("tokens") == ["orders", "eu",
                                                                          "created"]
    assert value('headers["Region"]') == "eu" and value("headers.Region") == "eu"
    assert value("key") == b"k-1" and value("id") == "ORDERS:7"
    assert value("timestamp") == datetime.datetime.fromtimestamp(1_700_000_000, datetime.UTC)
    bare = Message(b"\x00\x01binary")
    assert Expression("data").evaluate(bare) == b"\x00\x01binary", "bytes kept whole past a NUL"
    assert Expression("size(data)").evaluate(bare) == 8
    assert Expression('subject == "" && key == b"" && id == ""').test(bare), "zero values"
    assert Expression('timestamp == timestamp("1970-01-01T00:00:00Z")').test(bare)
    assert Expression("size(key)").evaluate(Message(b"", key=b"a\x00b")) == 3


def test_only_the_variables_read_are_bound() -> None:
    assert Expression("data.x > 1 && tokens[0] == 'a'").variables == ("data", "tokens")
    assert Expression("[1, 2].exists(data, data > 1)").variables == (), \
        "a comprehension's own variable is not the message's"
    assert Expression("true").variables == ()


def test_a_failure_on_one_message_is_poison_with_the_reason() -> None:
    with pytest.raises(ExpressionFailed) as caught:
        Expression("data.price > 1").evaluate(ORDER)
    assert isinstance(caught.value, RejectedError)
    assert "data.price > 1" in str(caught.value) and "price" in str(caught.value)
    with pytest.raises(ExpressionFailed, match=r"division by zero|divide"):
        Expression("data.amount / 0").evaluate(ORDER)
    with pytest.raises(ExpressionFailed, match="No matching overloads"):
        Expression("data.amount * 1.5").evaluate(ORDER)


def test_conditions_on_the_subject_are_remembered_per_subject() -> None:
    cond = Expression('subject.startsWith("orders.")', result="bool")
    assert cond.test(ORDER) and not cond.test(Message(b"", "other"))
    assert cond._memo == {"orders.eu.created": True, "other": False}
    data_cond = Expression("data.amount > 10", result="bool")
    assert data_cond.test(ORDER) and data_cond._memo == {}


def test_bindings_parse_the_payload_once() -> None:
    bindings = Bindings(ORDER)
    first = bindings.data
    assert Expression("data.amount").evaluate(bindings) == 12
    assert bindings.data is first
    assert parse_data(b"not json") == b"not json" and parse_data(b"") == b""
    assert parse_data(b"[1, 2]") == [1, 2] and parse_data(b'"s"') == "s"
    assert parse_data(b"\xff\xfe") == b"\xff\xfe"


def test_config_fields_compile_at_validation() -> None:
    class Options(PluginConfig):
        when: Condition
        value: Expr | None = None

    opts = Options.model_validate({"when": "data.amount > 10", "value": "subject"})
    assert isinstance(opts.when, Expression) and opts.when.test(ORDER)
    assert opts.model_dump() == {"when": "data.amount > 10", "value": "subject"}
    assert Options.model_json_schema()["properties"]["when"]["type"] == "string"
    with pytest.raises(ValidationError) as caught:
        Options.model_validate({"when": "size(tokens)"})
    assert isinstance(caught.value.errors()[0]["ctx"]["error"], ExpressionError)
    with pytest.raises(ValidationError, match="expected a CEL expression written as a string"):
        Options.model_validate({"when": 3})
    assert Options.model_validate({"when": "true"}) == Options.model_validate({"when": "true"})
