"""TensorRT-LLM engines per GPU product: fingerprint, store, build-or-fetch Jobs, verified serving.

Pure modules (no I/O): ``fingerprint``, ``discovery``, ``trtllm``, ``jobs``, ``reconcile``, ``serving``.
Runtime modules for the Job and the init containers (no Kubernetes API): ``store``, ``store_s3``,
``ensure``, ``fetch``. The kopf wiring is in ``controller``; the CLI in ``cli``.
"""
