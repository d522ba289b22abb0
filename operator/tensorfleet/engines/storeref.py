"""Where an Engine's artifact is stored, and how a pod reaches it (pure: volumes, env and CLI arguments).

``spec.storeRef`` picks the store per Engine; without it the operator's default applies
(``--engine-store pvc://CLAIM/PATH`` or ``s3://BUCKET/PREFIX``, with ``--engine-store-endpoint``,
``--engine-store-region`` and ``--engine-store-secret``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

STORE_MOUNT = "/mnt/engine-store"
STORE_VOLUME = "engine-store"


@dataclasses.dataclass(frozen=True)
class StoreRef:
    kind: str  # pvc | s3
    claim: str = ""
    path: str = "/"
    bucket: str = ""
    prefix: str = "engines"
    endpoint: str = ""
    region: str = ""
    secret: str = ""

    @classmethod
    def from_spec(cls, ref: Mapping[str, Any]) -> StoreRef:
        if "pvc" in ref:
            pvc = ref["pvc"]
            return cls("pvc", claim=str(pvc["claimName"]), path=str(pvc.get("path") or "/"))
        s3 = ref["s3"]
        return cls("s3", bucket=str(s3["bucket"]), prefix=str(s3.get("prefix", "engines")),
                   endpoint=str(s3.get("endpoint") or ""), region=str(s3.get("region") or ""),
                   secret=str((s3.get("credentialsSecretRef") or {}).get("name") or ""))

    @classmethod
    def parse_default(cls, uri: str, endpoint: str = "", region: str = "", secret: str = "") -> StoreRef | None:
        """The operator's default store from its settings; None when unset."""
        if not uri:
            return None
        if uri.startswith("pvc://"):
            claim, _, path = uri[len("pvc://"):].partition("/")
            return cls("pvc", claim=claim, path="/" + path)
        if uri.startswith("s3://"):
            bucket, _, prefix = uri[len("s3://"):].partition("/")
            return cls("s3", bucket=bucket, prefix=prefix, endpoint=endpoint, region=region, secret=secret)
        raise ValueError(f"engine store {uri!r}: expected pvc://CLAIM/PATH or s3://BUCKET/PREFIX")

    @property
    def uri(self) -> str:
        """The store as a pod sees it (the ``--store`` argument)."""
        if self.kind == "pvc":
            return f"file://{STORE_MOUNT}/{self.path.strip('/')}".rstrip("/")
        return f"s3://{self.bucket}/{self.prefix.strip('/')}".rstrip("/")

    @property
    def display(self) -> str:
        """The store as a user names it (in status)."""
        if self.kind == "pvc":
            return f"pvc://{self.claim}/{self.path.strip('/')}".rstrip("/")
        return self.uri

    def args(self) -> list[str]:
        args = ["--store", self.uri]
        if self.endpoint:
            args += ["--s3-endpoint", self.endpoint]
        if self.region:
            args += ["--s3-region", self.region]
        return args

    def env(self) -> list[dict[str, Any]]:
        if self.kind != "s3" or not self.secret:
            return []
        return [{"name": key, "valueFrom": {"secretKeyRef": {"name": self.secret, "key": key}}}
                for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]

    def volumes(self, read_only: bool) -> list[dict[str, Any]]:
        if self.kind != "pvc":
            return []
        return [{"name": STORE_VOLUME, "persistentVolumeClaim": {"claimName": self.claim, "readOnly": read_only}}]

    def mounts(self, read_only: bool) -> list[dict[str, Any]]:
        if self.kind != "pvc":
            return []
        return [{"name": STORE_VOLUME, "mountPath": STORE_MOUNT, "readOnly": read_only}]


def resolve(spec: Mapping[str, Any], default: StoreRef | None) -> StoreRef | None:
    ref = spec.get("storeRef")
    return StoreRef.from_spec(ref) if ref else default
