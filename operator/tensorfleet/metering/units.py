"""Resource units and prices: GPU-ms -> RU by GPU product and precision, RU and tokens -> money.

1 RU is 1 ms of busy time on the reference GPU (resource_units.yaml) at fp16. The defaults come from
NVIDIA datasheets; operators override factors per product and precision (the chart's
``metering.resourceUnits``, which the operator puts in the gateway configuration, or a file named by
TENSORFLEET_METERING_RU_TABLE_FILE). Money is computed in ``Decimal`` from the rounded figures stored in
the record, so anyone can recompute a price from a record.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PRECISIONS = ("fp16", "bf16", "fp8", "int8", "int4-awq")
MONEY_QUANTUM = Decimal("1e-12")
RU_DECIMALS = 6
GPU_MS_DECIMALS = 3


@dataclasses.dataclass(frozen=True)
class ResourceUnitTable:
    factors: Mapping[str, Mapping[str, float]]  # product -> precision -> RU per busy GPU-ms
    sources: Mapping[str, str]  # product -> where its figures come from
    overrides: Mapping[str, Mapping[str, float]]
    tier_prices: Mapping[str, Mapping[str, str]]  # tier -> {pricePerResourceUnit: "...", ...}

    def factor(self, product: str, precision: str) -> tuple[float, str]:
        """(RU per GPU-ms, how it was found): override, datasheet, fallback-precision or unknown-product."""
        if precision in self.overrides.get(product, {}):
            return self.overrides[product][precision], "override"
        known = self.factors.get(product, {})
        if precision in known:
            return known[precision], "datasheet"
        # A precision with no entry takes the product's fp16 factor, an override's (a product added there) first.
        fp16 = self.overrides.get(product, {}).get("fp16", known.get("fp16"))
        return (1.0, "unknown-product") if fp16 is None else (fp16, "fallback-precision")


def _default_document() -> dict[str, Any]:
    text = resources.files("tensorfleet.metering").joinpath("resource_units.yaml").read_text()
    return yaml.safe_load(text)


def datasheet_factors(document: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Factors from peak tensor throughput and bandwidth (formula in resource_units.yaml)."""
    reference = document["products"][document["reference"]["product"]]
    ref_tflops = float(reference["tflops"]["fp16"])
    ref_bandwidth = float(reference["bandwidthGBps"])
    out: dict[str, dict[str, float]] = {}
    for product, entry in document["products"].items():
        out[product] = {}
        for precision in PRECISIONS:
            compute = document["computePrecision"][precision]
            if compute not in entry["tflops"]:
                continue
            ratio = (float(entry["tflops"][compute]) / ref_tflops) * (float(entry["bandwidthGBps"]) / ref_bandwidth) \
                * (2.0 / float(document["weightBytes"][precision]))
            out[product][precision] = round(math.sqrt(ratio), 4)
    return out


def parse_overrides(data: Any, where: str) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, str]]]:
    """``{product: {precision: factor}}`` and optional ``tiers``; ValueError names the bad field."""
    if data is None:
        return {}, {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping of GPU product to {{precision: factor}}")
    factors: dict[str, dict[str, float]] = {}
    tiers: dict[str, dict[str, str]] = {}
    for product, entry in data.items():
        if product == "tiers":
            tiers = _parse_tiers(entry, f"{where}.tiers")
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}.{product}: expected {{precision: factor}}")
        factors[str(product)] = {}
        for precision, value in entry.items():
            field = f"{where}.{product}.{precision}"
            if precision not in PRECISIONS:
                raise ValueError(f"{field}: unknown precision; expected one of {', '.join(PRECISIONS)}")
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1000:
                raise ValueError(f"{field}={value!r}: must be a number in (0, 1000]")
            factors[str(product)][precision] = float(value)
    return factors, tiers


def _parse_tiers(data: Any, where: str) -> dict[str, dict[str, str]]:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected {{tier: {{pricePerResourceUnit: ...}}}}")
    out: dict[str, dict[str, str]] = {}
    for tier, prices in data.items():
        if not isinstance(prices, Mapping):
            raise ValueError(f"{where}.{tier}: expected a mapping of prices")
        out[str(tier)] = {}
        for name, value in prices.items():
            if name not in PRICE_FIELDS:
                raise ValueError(f"{where}.{tier}.{name}: unknown price; expected one of {', '.join(PRICE_FIELDS)}")
            out[str(tier)][name] = str(parse_price(value, f"{where}.{tier}.{name}"))
    return out


def read_override_file(path: str) -> Any:
    text = Path(path).read_text()
    try:
        return json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {exc}") from None


def load_table(config_overrides: Any = None, override_file: str | None = None) -> ResourceUnitTable:
    """Defaults, then the gateway configuration's overrides, then the file's (the file wins)."""
    document = _default_document()
    factors, tiers = parse_overrides(config_overrides, "metering.resourceUnits")
    if override_file:
        file_factors, file_tiers = parse_overrides(read_override_file(override_file), override_file)
        for product, entry in file_factors.items():
            factors.setdefault(product, {}).update(entry)
        tiers.update(file_tiers)
    sources = {p: str(e.get("source", "")) for p, e in document["products"].items()}
    return ResourceUnitTable(datasheet_factors(document), sources, factors, tiers)


PRICE_FIELDS = ("pricePerResourceUnit", "pricePerMillionInputTokens", "pricePerMillionOutputTokens")


def parse_price(value: Any, field: str) -> Decimal:
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{field}={value!r}: must be a non-negative decimal such as 0.0000021") from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"{field}={value!r}: must be a non-negative decimal such as 0.0000021")
    return price


def _money(value: Decimal) -> str:
    return format(value.quantize(MONEY_QUANTUM).normalize(), "f")


def price(ru: float, input_tokens: int, output_tokens: int, prices: Mapping[str, str]) -> dict[str, str]:
    """The price of a record and its parts, as decimal strings (from the rounded RU the record holds)."""
    per_ru = Decimal(prices.get("pricePerResourceUnit", "0"))
    per_in = Decimal(prices.get("pricePerMillionInputTokens", "0"))
    per_out = Decimal(prices.get("pricePerMillionOutputTokens", "0"))
    parts = {
        "resourceUnits": Decimal(repr(round(ru, RU_DECIMALS))) * per_ru,
        "inputTokens": Decimal(input_tokens) * per_in / Decimal(1_000_000),
        "outputTokens": Decimal(output_tokens) * per_out / Decimal(1_000_000),
    }
    out = {name: _money(value) for name, value in parts.items()}
    out["total"] = _money(sum(parts.values(), Decimal(0)))
    return out
