"""Stock in the ops console: products are editable by staff, reservations are read-only.

``reserved`` is never edited by hand: only reservations move it. Saving a product writes only
the fields that changed, so an edit can never overwrite a ``reserved`` count that a
reservation changed while the form was open.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin
from django.contrib.admin.options import ShowFacets
from django.db.models import Q

from config.admin import ReadOnlyAdmin, ReadOnlyTabularInline, order_link, search_by_id_or_order
from config.money import currency_problem, pair_problem
from inventory.models import Product, Reservation, ReservationLine


class ProductForm(forms.ModelForm):
    class Meta:
        model = Product
        fields = ("sku", "name", "price", "currency", "stock_on_hand")

    def clean_stock_on_hand(self) -> int:
        stock = self.cleaned_data["stock_on_hand"]
        if self.instance.pk is not None:
            # Read the current reservations now, not the ones the form was opened with.
            reserved = Product.objects.values_list("reserved", flat=True).get(pk=self.instance.pk)
            if stock < reserved:
                raise forms.ValidationError(
                    f"{reserved} units are reserved by open orders; stock on hand cannot go "
                    "below that."
                )
        if stock < 0:
            raise forms.ValidationError("Stock on hand cannot be negative.")
        return stock

    def clean_currency(self) -> str:
        # Either case, stored upper case: as the API takes it (and an order's country).
        currency = self.cleaned_data["currency"].upper()
        problem = currency_problem(currency)
        if problem:
            raise forms.ValidationError(problem)
        return currency

    def clean(self) -> dict:
        """The price must fit its currency (``10.50 JPY`` would fail every order's payment),
        when either changes; the admin then writes both (``save_model``), so the pair stored
        is the pair checked."""
        cleaned = super().clean() or self.cleaned_data
        found = pair_problem(self.changed_data, cleaned.get("price"), cleaned.get("currency"))
        if found:
            self.add_error(*found)
        return cleaned


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    form = ProductForm
    list_display = ("sku", "name", "price", "currency", "stock_on_hand", "reserved", "available")
    search_fields = ("sku", "name")
    ordering = ("sku",)
    readonly_fields = ("reserved", "available", "created_at", "updated_at")
    fields = ("sku", "name", "price", "currency", "stock_on_hand", *readonly_fields)
    show_facets = ShowFacets.NEVER

    @admin.display(description="available")
    def available(self, product: Product) -> int:
        return product.available

    def save_model(self, request, obj: Product, form, change: bool) -> None:
        if change:
            changed = [f for f in form.changed_data if f in form.Meta.fields]
            if {"price", "currency"} & set(changed):
                # Both, as the form checked them: a price changed elsewhere since the form was
                # opened must not pair with this currency unchecked.
                changed = list(dict.fromkeys([*changed, "price", "currency"]))
            if changed:
                obj.save(update_fields=[*changed, "updated_at"])
        else:
            obj.save()


class ReservationLineInline(ReadOnlyTabularInline):
    model = ReservationLine
    fields = ("product", "quantity")
    readonly_fields = fields


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdmin):
    list_display = ("id", "order", "status", "tombstone", "created_at", "updated_at")
    list_filter = ("status",)
    list_display_links = ("id",)
    search_fields = ("id",)
    search_help_text = "Exact reservation id, order id or saga step key."
    ordering = ("-created_at",)
    inlines = (ReservationLineInline,)
    readonly_fields = ("order",)
    fields = (
        "id",
        "order",
        "key",
        "status",
        "tombstone",
        "settled_by_key",
        "created_at",
        "updated_at",
    )

    @admin.display(description="order")
    def order(self, reservation: Reservation) -> str:
        return order_link(reservation.order_id)

    def get_search_results(self, request, queryset, search_term):
        return search_by_id_or_order(queryset, search_term, other=lambda term: Q(key=term))
