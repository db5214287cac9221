from decimal import Decimal

import pytest

from nodeagent.api.quantity import QuantityError, cpu_millicores, memory_bytes, parse_quantity


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0", Decimal(0)),
        ("1", Decimal(1)),
        ("+5", Decimal(5)),
        ("-5", Decimal(-5)),
        ("1.5", Decimal("1.5")),
        (".5", Decimal("0.5")),
        ("5.", Decimal(5)),
        ("250m", Decimal("0.25")),
        ("100n", Decimal("1e-7")),
        ("3u", Decimal("3e-6")),
        ("1k", Decimal(1000)),
        ("2M", Decimal(2_000_000)),
        ("1G", Decimal(10**9)),
        ("1T", Decimal(10**12)),
        ("1P", Decimal(10**15)),
        ("1E", Decimal(10**18)),  # exa, not an exponent
        ("1Ki", Decimal(1024)),
        ("64Mi", Decimal(64 * 2**20)),
        ("1.5Gi", Decimal(3 * 2**29)),
        ("1Ti", Decimal(2**40)),
        ("1Pi", Decimal(2**50)),
        ("1Ei", Decimal(2**60)),
        ("1e3", Decimal(1000)),
        ("1E3", Decimal(1000)),
        ("12e-3", Decimal("0.012")),
        ("1.5e+2", Decimal(150)),
    ],
)
def test_parse_strings(text, expected):
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("value, expected", [(2, Decimal(2)), (0.5, Decimal("0.5")), (0.1, Decimal("0.1")),
                                             (Decimal("1.25"), Decimal("1.25"))])
def test_parse_yaml_numbers(value, expected):
    assert parse_quantity(value) == expected


@pytest.mark.parametrize(
    "bad",
    ["", "12Mx", "1K", "1mi", "abc", "1 Gi", " 1", "1Gi ", ".", "--1", "1e", "1e1.5", "0x10", "Mi", "1ki", "1e999",
     "1e-999", "1 "],
)
def test_invalid_strings_quote_the_value(bad):
    with pytest.raises(QuantityError) as info:
        parse_quantity(bad)
    assert repr(bad) in str(info.value)
    assert info.value.value == bad
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("bad", [True, None, [1], {"a": 1}, float("nan"), float("inf")])
def test_invalid_types(bad):
    with pytest.raises(QuantityError):
        parse_quantity(bad)


@pytest.mark.parametrize(
    "value, millis",
    [("250m", 250), ("1", 1000), (2, 2000), (0.5, 500), ("0.1", 100), ("0.1m", 1), ("1001u", 2), ("100n", 1),
     ("1.5", 1500), ("0", 0), ("1k", 1_000_000)],
)
def test_cpu_millicores_round_up(value, millis):
    assert cpu_millicores(value) == millis


@pytest.mark.parametrize(
    "value, expected",
    [("64Mi", 64 * 2**20), ("1G", 10**9), ("1.5", 2), (1024, 1024), ("1e3", 1000), ("100m", 1), ("129M", 129_000_000),
     ("1Gi", 2**30), ("0.5Ki", 512)],
)
def test_memory_bytes_round_up(value, expected):
    assert memory_bytes(value) == expected


def test_too_large_for_int64():
    with pytest.raises(QuantityError, match="too large"):
        memory_bytes("100Ei")
    assert memory_bytes("7Ei") == 7 * 2**60


def test_large_exponent_is_cheap_and_bounded():
    assert parse_quantity("1e100") == Decimal("1e100")
    with pytest.raises(QuantityError, match="out of range"):
        parse_quantity("1e123456789012")
