"""Per-request GPU metering: NVML sampling, attribution, resource units, the signed ledger, export."""
