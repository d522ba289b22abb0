"""Autoscaling of InferenceServices on queue depth, concurrency, KV-cache usage and GPU utilization.

* ``signals``: what a pod reports (its gateway's Prometheus metrics) and what the operator knows about it
  (ready, warming, pending, unschedulable), folded into one ``Observation`` per service and instant;
* ``policy``: the pure decision, observations and history in, desired replicas out;
* ``render``: HorizontalPodAutoscaler and KEDA ScaledObject for ``mode: hpa`` and ``mode: keda``;
* ``scraper`` and ``daemon``: the operator side (scrape pods, decide, act through the scale subresource);
* ``simulator``: trace replay that runs the same policy against modelled GPU replicas.
"""
