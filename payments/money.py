"""Money is ``Decimal`` everywhere in this codebase; only the provider speaks integer minor units.

Floats are refused outright rather than rounded, so a float that slips in is a loud bug instead
of a cent lost somewhere.
"""

from __future__ import annotations

from decimal import Decimal

#: ISO 4217 currencies without minor units (Stripe's "zero-decimal" list, abridged).
ZERO_DECIMAL_CURRENCIES = frozenset(
    {"BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "VND", "VUV", "XAF"}
)
#: Three-decimal currencies do not fit our two-decimal amount columns.
UNSUPPORTED_CURRENCIES = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})


def currency_exponent(currency: str) -> int:
    code = currency.upper()
    if len(code) != 3 or not code.isalpha():
        raise ValueError(f"not an ISO 4217 currency code: {currency!r}")
    if code in UNSUPPORTED_CURRENCIES:
        raise ValueError(f"currency {code} has three decimals and is not supported")
    return 0 if code in ZERO_DECIMAL_CURRENCIES else 2


def to_minor(amount: Decimal, currency: str) -> int:
    """``Decimal("12.34")`` EUR -> ``1234``; refuses floats and sub-minor-unit precision."""
    if not isinstance(amount, Decimal):
        raise TypeError(f"amounts must be Decimal, not {type(amount).__name__}")
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"amount must be a finite, non-negative Decimal, got {amount}")
    scaled = amount.scaleb(currency_exponent(currency))
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} has more precision than {currency.upper()} allows")
    return int(scaled)


def from_minor(amount_minor: int, currency: str) -> Decimal:
    """``1234`` EUR -> ``Decimal("12.34")``, always with the currency's number of places."""
    exponent = currency_exponent(currency)
    return (Decimal(int(amount_minor)).scaleb(-exponent)).quantize(Decimal(1).scaleb(-exponent))
