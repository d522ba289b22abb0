"""A stand-in cluster for the quickstart and the tests: an embedded API emulator and simulated kubelets.

Nothing here runs against a real cluster; ``tensorfleet run`` uses it only when no cluster is configured.
"""
