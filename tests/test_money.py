"""Decimal in, integer minor units at the provider, Decimal out; floats never."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from config.money import currency_problem, from_minor, price_problem, to_minor


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [("12.34", "EUR", 1234), ("0.01", "usd", 1), ("10", "EUR", 1000), ("500", "JPY", 500)],
)
def test_to_minor(amount, currency, minor):
    """Amounts scale by the currency's exponent: cents for EUR, whole yen for JPY."""
    assert to_minor(Decimal(amount), currency) == minor


def test_from_minor_keeps_the_currency_places():
    """Minor units come back as Decimal with the currency's number of places."""
    assert from_minor(1230, "EUR") == Decimal("12.30")
    assert str(from_minor(1230, "EUR")) == "12.30"
    assert str(from_minor(500, "JPY")) == "500"


def test_floats_are_refused():
    """A float is a bug: it is rejected, not rounded."""
    with pytest.raises(TypeError):
        to_minor(12.34, "EUR")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("amount", "currency"), [("12.345", "EUR"), ("1.5", "JPY"), ("-1", "EUR"), ("NaN", "EUR")]
)
def test_impossible_amounts_are_refused(amount, currency):
    """Sub-cent precision, negative and non-finite amounts never reach the provider."""
    with pytest.raises(ValueError):
        to_minor(Decimal(amount), currency)


@pytest.mark.parametrize("currency", ["KWD", "EURO", "E1R"])
def test_unsupported_currencies_are_refused(currency):
    """Three-decimal currencies and non-codes are rejected rather than mis-scaled."""
    with pytest.raises(ValueError):
        to_minor(Decimal("1.00"), currency)


@given(minor=st.integers(min_value=0, max_value=10**12), currency=st.sampled_from(["EUR", "JPY"]))
def test_round_trip_is_exact(minor, currency):
    """Minor units -> Decimal -> minor units loses nothing, for any amount."""
    assert to_minor(from_minor(minor, currency), currency) == minor


@pytest.mark.parametrize(
    ("currency", "problem"),
    [
        ("EUR", None),
        ("JPY", None),
        ("XOF", None),
        ("ZAZ", "not an ISO 4217 currency code in use"),
        ("XAU", "not an ISO 4217 currency code in use"),  # gold, not money to charge
        ("eur", "not an ISO 4217 currency code in use"),  # stored upper case
        ("KWD", "three decimal places"),
        ("BHD", "three decimal places"),
        ("IQD", "three decimal places"),  # ISO 4217 gives both three
        ("LYD", "three decimal places"),
    ],
)
def test_the_currencies_a_price_can_be_in(currency, problem):
    found = currency_problem(currency)
    assert (found is None) if problem is None else (problem in found), found


@pytest.mark.parametrize(
    ("price", "currency", "fits"),
    [
        ("10.50", "EUR", True),
        ("10", "EUR", True),
        ("1000", "JPY", True),
        ("1000.00", "JPY", True),  # the column's two places, both zero
        ("10.50", "JPY", False),
        ("500.5", "KRW", False),  # no minor units either
    ],
)
def test_a_price_fits_its_currency_or_says_why(price, currency, fits):
    """What fits is exactly what the provider can be asked for."""
    assert (price_problem(Decimal(price), currency) is None) == fits
    if fits:
        assert to_minor(Decimal(price), currency) >= 0
    else:
        with pytest.raises(ValueError, match="more precision"):
            to_minor(Decimal(price), currency)


@pytest.mark.parametrize("currency", ["XOF", "XPF", "UGX", "ISK"])
def test_currencies_without_minor_units_in_iso_4217_take_whole_prices(currency):
    """Whatever the provider's table says of them (amounts travel to it as before)."""
    assert "whole units" in price_problem(Decimal("10.50"), currency)
    assert price_problem(Decimal("10"), currency) is None
