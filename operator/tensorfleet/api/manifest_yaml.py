"""Reading Kubernetes manifests from YAML as the API server does.

PyYAML's safe loader turns an unquoted ``2020-01-01`` into a ``datetime.date``, which no schema check or
JSON encoder expects; kubectl (sigs.k8s.io/yaml, YAML 1.1 through JSON) keeps such scalars as strings.
``ManifestLoader`` is the safe loader without the timestamp resolver; everything that reads manifests
(render, the quickstart, ``engine key``, ``simulate --service``) uses it. An explicit tag whose value JSON
cannot hold (``!!timestamp``, ``!!binary``, ``!!set``) is a ``yaml.YAMLError`` naming the line, as invalid
YAML is.
"""

from __future__ import annotations

from typing import IO, Any

import yaml

_NOT_JSON_TAGS = ("timestamp", "binary", "set")


class ManifestLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that keeps date- and time-like scalars as strings and loads only JSON values."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_not_json(self, node: yaml.Node) -> Any:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise yaml.constructor.ConstructorError(
            None, None, f"a {tag} value is not JSON, which is all a manifest holds; quote it to keep it a string",
            node.start_mark)


for _name in _NOT_JSON_TAGS:
    ManifestLoader.add_constructor(f"tag:yaml.org,2002:{_name}", ManifestLoader.construct_not_json)


def load_all(stream: str | IO[str]) -> list[Any]:
    """The documents of ``stream``, empty ones left out; ``yaml.YAMLError`` on invalid YAML."""
    return [doc for doc in yaml.load_all(stream, Loader=ManifestLoader) if doc is not None]
