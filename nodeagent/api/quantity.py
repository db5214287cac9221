"""Kubernetes ``resource.Quantity`` parsing.

    quantity := sign? number suffix
    number   := digits | digits "." digits? | "." digits
    suffix   := "" | binarySI (Ki Mi Gi Ti Pi Ei)
              | decimalSI (n u m k M G T P E)
              | ("e" | "E") sign? digits

A suffix that is exactly a decimal SI unit wins over the exponent reading, so ``1E``
is one exa while ``1E3`` is a thousand (the API server's rule). YAML hands us ints and
floats for unquoted numbers; those are quantities too. Values become ``Decimal`` so
``0.1`` CPU is exactly 100 millicores.

Conversions round up like ``Quantity.MilliValue()`` / ``Quantity.Value()``: a request
of ``0.1m`` CPU is 1 millicore, ``1.5`` bytes is 2 bytes.
"""

from __future__ import annotations

import decimal
import re
from decimal import Decimal

INT64_MAX = 2**63 - 1

_BINARY_SI = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SI_EXPONENT = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_SHAPE = re.compile(r"^([+-]?)([0-9]+\.?[0-9]*|\.[0-9]+)(.*)$", re.S)
_EXPONENT = re.compile(r"^[eE]([+-]?[0-9]+)$")
# Far beyond any real resource amount, but small enough that Decimal arithmetic and
# int() conversions stay cheap even for hostile input such as "1e999999999".
_MAX_EXPONENT = 100
# Exact arithmetic for every quantity the grammar can express within _MAX_EXPONENT.
_CONTEXT = decimal.Context(prec=200, rounding=decimal.ROUND_CEILING, Emax=1000, Emin=-1000)


class QuantityError(ValueError):
    """A value is not a Kubernetes quantity; the message quotes it."""

    def __init__(self, value: object, reason: str) -> None:
        super().__init__(f"invalid quantity {value!r}: {reason}")
        self.value = value
        self.reason = reason


def parse_quantity(value: object) -> Decimal:
    """The exact amount ``value`` stands for (``"128Mi"`` -> ``Decimal(134217728)``)."""
    if isinstance(value, bool) or value is None:
        raise QuantityError(value, "expected a number or a string such as '500m' or '64Mi'")
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise QuantityError(value, "not a finite number")
        # str() gives the shortest decimal that round-trips: 0.1 -> "0.1", not 0.1000000000000000055...
        return Decimal(str(value))
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise QuantityError(value, "not a finite number")
        return value
    if not isinstance(value, str):
        raise QuantityError(value, f"expected a number or a string, got {type(value).__name__}")
    if not value:
        raise QuantityError(value, "empty string")
    match = _SHAPE.match(value)
    if match is None:
        raise QuantityError(
            value, "must be a number with an optional suffix (e.g. '250m', '1.5', '64Mi', '1G', '1e3')"
        )
    sign, number, suffix = match.groups()
    amount = Decimal(number if not number.endswith(".") else number[:-1])
    if sign == "-":
        amount = -amount
    if suffix in _BINARY_SI:
        result = _CONTEXT.multiply(amount, Decimal(_BINARY_SI[suffix]))
    elif suffix in _DECIMAL_SI_EXPONENT:
        result = amount.scaleb(_DECIMAL_SI_EXPONENT[suffix], _CONTEXT)
    else:
        exponent = _EXPONENT.match(suffix)
        if exponent is None:
            raise QuantityError(
                value,
                f"unknown suffix {suffix!r} (use n, u, m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or e<exponent>)",
            )
        power = int(exponent.group(1))
        if abs(power) > _MAX_EXPONENT:
            raise QuantityError(value, f"exponent {power} is out of range")
        result = amount.scaleb(power, _CONTEXT)
    if result and result.adjusted() > _MAX_EXPONENT:
        raise QuantityError(value, "value is out of range")
    return result


def _ceil_int(amount: Decimal) -> int:
    return int(amount.to_integral_value(rounding=decimal.ROUND_CEILING))


def cpu_millicores(value: object) -> int:
    """CPU as whole millicores, rounded up: ``"250m"`` -> 250, ``0.5`` -> 500, ``"2"`` -> 2000."""
    millis = _ceil_int(_CONTEXT.multiply(parse_quantity(value), Decimal(1000)))
    if abs(millis) > INT64_MAX:
        raise QuantityError(value, "too large for a CPU amount")
    return millis


def memory_bytes(value: object) -> int:
    """An amount of bytes (memory, storage), rounded up: ``"64Mi"`` -> 67108864."""
    amount = _ceil_int(parse_quantity(value))
    if abs(amount) > INT64_MAX:
        raise QuantityError(value, "too large for an amount of bytes")
    return amount


def integer_value(value: object) -> int:
    """The amount rounded up to a whole unit (``Quantity.Value()``), for any resource."""
    return memory_bytes(value)
