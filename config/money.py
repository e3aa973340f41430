"""Money is ``Decimal`` everywhere in this codebase; only the provider speaks integer minor units.

Floats are refused outright rather than rounded, so a float that slips in is a loud bug instead
of a cent lost somewhere. The currency rules live here, below every app: the catalog refuses a
price its currency cannot carry (:func:`price_problem`) when staff set it, so that no order
fails later at the payment step over it.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

#: ISO 4217 codes of the currencies in use (funds, precious metals, drawing rights and the
#: testing codes left out).
_CODES = """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD
    CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS
    GIP GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW
    KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR
    MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR
    SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX
    USD UYU UZS VED VES VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """
CURRENCY_CODES: frozenset[str] = frozenset(_CODES.split())
#: ISO 4217 currencies without minor units (Stripe's "zero-decimal" list, abridged). Stored
#: provider amounts are read through these tables: a change reinterprets them, so none is made
#: without a migration of those amounts.
ZERO_DECIMAL_CURRENCIES = frozenset(
    {"BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "VND", "VUV", "XAF"}
)
#: Three-decimal currencies do not fit our two-decimal amount columns.
UNSUPPORTED_CURRENCIES = frozenset({"BHD", "JOD", "KWD", "OMR", "TND"})
#: ISO 4217's own minor units, for what the catalog accepts (the tables above are how amounts
#: travel to the provider, and stay as they are): a price in a currency without minor units is
#: in whole units, and a currency with three decimals is not priced here at all.
_ISO_ZERO = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF"
ISO_ZERO_DECIMAL = frozenset(_ISO_ZERO.split())
#: UNSUPPORTED_CURRENCIES, and the two the provider's tables still carry with two decimals.
_ISO_THREE = "BHD IQD JOD KWD LYD OMR TND"
ISO_THREE_DECIMAL = frozenset(_ISO_THREE.split())


def currency_problem(currency: str) -> str | None:
    """Why the catalog cannot price in ``currency`` (upper case, as stored), or ``None``."""
    if currency not in CURRENCY_CODES:
        return f"{currency!r} is not an ISO 4217 currency code in use (upper case, e.g. EUR)."
    if currency in ISO_THREE_DECIMAL:
        return f"{currency} has three decimal places; prices here have at most two."
    return None


def pair_problem(
    changed: Iterable[str], price: Decimal | None, currency: str | None
) -> tuple[str, str] | None:
    """For a product whose ``changed`` fields include its price or currency: the field to
    blame (the price if it changed, else the currency) and why the pair it would have cannot
    be charged; ``None`` if it can. A change of neither is not asked about a pair stored before
    these rules. The API, the ops console and the catalog's write under its lock all ask this.
    """
    changed = {"price", "currency"} & set(changed)
    if not changed or price is None or not currency:
        return None
    problem = currency_problem(currency) or price_problem(price, currency)
    if problem is None:
        return None
    return ("price" if "price" in changed else "currency", problem)


def price_problem(price: Decimal, currency: str) -> str | None:
    """Why ``price`` cannot be charged in ``currency`` (a supported one), or ``None``: a price
    with cents in a currency without minor units (``10.50 JPY``) would fail every order's
    payment."""
    places = 0 if currency in ISO_ZERO_DECIMAL else currency_exponent(currency)
    if price != price.quantize(Decimal(1).scaleb(-places)):
        unit = "whole units" if places == 0 else f"at most {places} decimal places"
        return f"{currency} prices are in {unit}."
    return None


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
