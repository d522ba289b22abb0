"""Trace-replay simulator for the autoscaling policy (``tensorfleet simulate``).

It replays a request trace (TIMESTAMP, ContextTokens, GeneratedTokens) against modelled GPU replicas
and scales them with the *same* ``tensorfleet.autoscale.policy.decide`` the operator runs, fed the
same ``Observation`` the operator builds from gateway metrics. In the same run it replays the trace
under an HPA-like baseline and under an oracle lower bound, so the figures are ratios from one run.

Pure Python (no NumPy); matplotlib is needed only for the PNG plot and is imported lazily.
"""
