"""Reading Kubernetes manifests from YAML as the API server does.

PyYAML's safe loader turns an unquoted ``2020-01-01`` into a ``datetime.date``, which no schema check or
JSON encoder expects; kubectl (sigs.k8s.io/yaml, YAML 1.1 through JSON) keeps such scalars as strings.
``ManifestLoader`` is the safe loader without the timestamp resolver; everything that reads manifests
(render, the quickstart, ``engine key``, ``simulate --service``) uses it.
"""

from __future__ import annotations

from typing import IO, Any

import yaml


class ManifestLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that keeps date- and time-like scalars as strings."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


def load_all(stream: str | IO[str]) -> list[Any]:
    """The documents of ``stream``, empty ones left out; ``yaml.YAMLError`` on invalid YAML."""
    return [doc for doc in yaml.load_all(stream, Loader=ManifestLoader) if doc is not None]
