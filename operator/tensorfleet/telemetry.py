"""Names of the gateway metrics other parts depend on (the autoscaler scrapes them from every pod).

The gateway exports these on its admin port at /metrics. Keep the names stable: dashboards, alerts,
the HPA/KEDA renderings and the autoscaler read them.
"""

QUEUE_DEPTH = "tensorfleet_gateway_queue_depth"  # gauge: requests waiting in the gateway for admission
ENGINE_WAITING = "tensorfleet_engine_waiting_requests"  # gauge: the engine's own waiting count, re-exported
IN_FLIGHT = "tensorfleet_gateway_in_flight_requests"  # gauge: requests admitted and not finished
GPU_UTILIZATION = "tensorfleet_gpu_utilization_ratio"  # gauge 0..1 from NVML; absent without a GPU
KV_CACHE_USAGE = "tensorfleet_engine_kv_cache_usage_ratio"  # gauge 0..1, re-exported from the engine
READY = "tensorfleet_gateway_ready"  # gauge 0/1: warm and serving
STARTUP_SECONDS = "tensorfleet_gateway_startup_seconds"  # gauge: this pod's cold start, container start -> ready

# The tenant label value of every tenant past the label cap (--max-tenant-labels), in the gateway's and metering's
# per-tenant metrics. A tenant name starts with a letter or digit (gateway.auth.TENANT_NAME, the CRD's rules), so
# no real tenant can have this value and be summed with the overflow.
OTHER_TENANT = "_other"
