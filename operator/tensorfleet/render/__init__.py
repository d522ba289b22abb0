"""Pure manifest builders: spec in, Kubernetes objects (plain dicts) out. No I/O here."""
