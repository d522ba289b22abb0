"""The gateway sidecar: the only door to the engine in every serving pod.

It proxies the OpenAI-compatible API (vLLM) or Triton's generate endpoints, gates readiness on a
warm-up, enforces the token policy and tenant auth, exports engine and gateway metrics, and hands one
metering event per request to an injected sink. It imports neither kopf nor the Kubernetes API module.
"""
