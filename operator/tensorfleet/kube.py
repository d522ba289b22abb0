"""All Kubernetes API I/O of the operator: one async client with retries, and where credentials come from.

Writes of child objects use server-side apply (field manager ``tensorfleet``), status goes through the
status subresource with a merge patch. 409 conflicts, 429 and 5xx answers and dropped connections
are retried with exponential backoff and jitter (``Retry-After`` is honoured).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import logging
import os
import pathlib
import random
import ssl
import uuid
from collections.abc import Callable, Generator, Mapping
from typing import Any, Literal

import httpx
import yaml

from tensorfleet import API_GROUP, API_VERSION, FIELD_MANAGER, __version__

logger = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PatchType = Literal["merge", "apply"]
_CONTENT_TYPES = {"merge": "application/merge-patch+json", "apply": "application/apply-patch+yaml"}
# Names our requests in the API server's audit log (kopf's own requests say kopf/VERSION).
USER_AGENT = f"{FIELD_MANAGER}/{__version__}"


@dataclasses.dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if subresource:
            base += f"/{subresource}"
        return base


RESOURCES: dict[tuple[str, str], Resource] = {
    ("v1", "ConfigMap"): Resource("", "v1", "configmaps"),
    ("v1", "Service"): Resource("", "v1", "services"),
    ("v1", "Pod"): Resource("", "v1", "pods"),
    ("v1", "Secret"): Resource("", "v1", "secrets"),
    ("v1", "Event"): Resource("", "v1", "events"),
    ("v1", "Node"): Resource("", "v1", "nodes", namespaced=False),
    ("apps/v1", "Deployment"): Resource("apps", "v1", "deployments"),
    ("batch/v1", "Job"): Resource("batch", "v1", "jobs"),
    ("policy/v1", "PodDisruptionBudget"): Resource("policy", "v1", "poddisruptionbudgets"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): Resource("autoscaling", "v2", "horizontalpodautoscalers"),
    ("keda.sh/v1alpha1", "ScaledObject"): Resource("keda.sh", "v1alpha1", "scaledobjects"),
    (f"{API_GROUP}/{API_VERSION}", "InferenceService"): Resource(API_GROUP, API_VERSION, "inferenceservices"),
    (f"{API_GROUP}/{API_VERSION}", "Engine"): Resource(API_GROUP, API_VERSION, "engines"),
}


def resource_for(api_version: str, kind: str) -> Resource:
    try:
        return RESOURCES[(api_version, kind)]
    except KeyError:
        raise ValueError(f"tensorfleet does not manage {kind} of {api_version}") from None


class APIError(Exception):
    """The API server refused a request (after retries, where retrying made sense)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class Vanished(Exception):
    """The object a client writes for (``KubeClient.acting_for``) is gone, or its name is another object's now."""


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate; the same for kopf and for our client."""

    server: str
    ca_path: str | None = None
    insecure: bool = False
    token: str | None = None
    certificate_path: str | None = None
    private_key_path: str | None = None
    default_namespace: str | None = None
    # Called before each request for a fresh token (in-cluster tokens rotate, exec plugins expire).
    token_source: Callable[[], str | None] | None = dataclasses.field(default=None, compare=False, repr=False)

    def current_token(self) -> str | None:
        return self.token_source() if self.token_source is not None else self.token


class _BearerAuth(httpx.Auth):
    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._connection.current_token()
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request


SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def discover_connection(kubeconfig: str | None = None, context: str | None = None,
                        cluster: str = "auto") -> Connection | None:
    """The connection ``cluster`` (``--cluster``) asks for: ``incluster`` only the pod's service account,
    ``kubeconfig`` only a kubeconfig, ``auto`` the service account in a pod unless ``--kubeconfig`` or
    ``--context`` is given, else a kubeconfig. None only for ``auto`` outside a pod when neither a kubeconfig
    (flag or $KUBECONFIG) nor a context was named and ~/.kube/config does not exist: a named cluster never falls
    back to the emulator. ValueError, in one line naming the flag or variable and its value, when the one asked
    for cannot be used."""
    from kubernetes import client

    in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    cfg = client.Configuration()
    if cluster == "incluster" and context:
        raise ValueError(f"--context {context}: --cluster=incluster uses the pod's service account, which has "
                         "no contexts; leave --context out or use --cluster=kubeconfig")
    if cluster == "incluster" or (cluster == "auto" and in_pod and not kubeconfig and not context):
        if not in_pod:
            raise ValueError("--cluster=incluster: not in a pod (KUBERNETES_SERVICE_HOST is not set)")
        _load(cfg, "the in-cluster service account", None, None)
        ns_file = pathlib.Path(SERVICE_ACCOUNT, "namespace")
        return _connection(cfg, ns_file.read_text().strip() if ns_file.exists() else None)
    named, path = _kubeconfig_path(kubeconfig)
    if not any(os.path.exists(p) for p in path.split(os.pathsep)):
        if cluster == "auto" and named is None and not context:
            return None
        asked = f"--context {context}" if cluster == "auto" else f"--cluster={cluster}"
        where = named or f"{asked}: the default kubeconfig {path}"
        raise ValueError(f"{where}: no such file")
    _load(cfg, f"{named or f'kubeconfig {path}'}{f' --context {context}' if context else ''}", path, context)
    return _connection(cfg, None)


def _kubeconfig_path(kubeconfig: str | None) -> tuple[str | None, str]:
    """Which kubeconfig, and how it was named (``--kubeconfig PATH``, ``KUBECONFIG=PATH``; None: the default)."""
    if kubeconfig:
        return f"--kubeconfig {kubeconfig}", kubeconfig
    if from_env := os.environ.get("KUBECONFIG"):
        return f"KUBECONFIG={from_env}", from_env
    return None, os.path.expanduser("~/.kube/config")


def _load(cfg: Any, where: str, path: str | None, context: str | None) -> None:
    """Fill ``cfg`` from the service account (``path`` None) or a kubeconfig; ValueError naming ``where``."""
    from kubernetes import config

    try:
        if path is None:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, context=context, client_configuration=cfg)
    except (config.ConfigException, yaml.YAMLError, OSError) as exc:
        raise ValueError(f"{where}: {' '.join(str(exc).split())}") from None
    except (TypeError, AttributeError, KeyError, ValueError) as exc:
        # The client indexes the file's YAML without checking its shape (a list, a scalar, ``clusters: 5``),
        # and decodes base64 fields (``certificate-authority-data``) with binascii.Error, a ValueError.
        raise ValueError(f"{where}: not a usable kubeconfig ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())}); expected a mapping with clusters, users and contexts "
                         "lists, and valid base64 in its *-data fields") from None


def _connection(cfg: Any, namespace: str | None) -> Connection:
    def token() -> str | None:
        # The kubernetes client refreshes expiring tokens (exec plugins, rotated files) in this call.
        value = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
        return value[7:] if value and value.lower().startswith("bearer ") else value

    return Connection(
        server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl, token=token(),
        certificate_path=cfg.cert_file, private_key_path=cfg.key_file, default_namespace=namespace,
        token_source=token,
    )


@dataclasses.dataclass
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), self.max_delay)
        backoff = min(self.max_delay, self.base_delay * 2**attempt)
        return backoff * (0.5 + random.random() / 2)  # jitter keeps retries of many objects apart


class KubeClient:
    def __init__(self, connection: Connection, retry: RetryPolicy | None = None, timeout: float = 30.0) -> None:
        self.connection = connection
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=connection.server, verify=_ssl_context(connection), auth=_BearerAuth(connection), timeout=timeout,
            headers={"User-Agent": USER_AGENT},
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )
        self.requests: dict[str, int] = {}  # by HTTP method, for metrics and the benchmark
        self._owner: Mapping[str, Any] | None = None  # see acting_for
        self._owner_confirmed = False

    async def aclose(self) -> None:
        await self._http.aclose()

    def acting_for(self, owner: Mapping[str, Any]) -> KubeClient:
        """This client (its connection and counters) for one pass of writes on behalf of ``owner``: before the
        first write, one read confirms that ``owner`` still exists, as the same object (its uid); ``Vanished``
        when not. A daemon's DELETED event can be lost (a watch that relists after "410 Gone" reports no
        deletions), and the name may be a new object's by now. A pass that writes nothing reads nothing more."""
        view = copy.copy(self)
        view._owner, view._owner_confirmed = owner, False
        return view

    async def _confirm_owner(self) -> None:
        if self._owner is None or self._owner_confirmed:
            return
        meta = self._owner["metadata"]
        found = await self.find(self._owner["apiVersion"], self._owner["kind"], meta.get("namespace"), meta["name"])
        if found is None or found["metadata"].get("uid") != meta.get("uid"):
            raise Vanished(f"{self._owner['kind']} {meta.get('namespace')}/{meta['name']} (uid {meta.get('uid')}) "
                           "is gone" + (", its name is another object's" if found else ""))
        self._owner_confirmed = True

    async def _request(self, method: str, path: str, *, json: Any = None, params: Mapping[str, str] | None = None,
                       content_type: str | None = None, retry_conflicts: bool = True) -> httpx.Response:
        headers = {"Content-Type": content_type} if content_type else None
        if method in WRITE_METHODS:
            await self._confirm_owner()
        for attempt in range(self.retry.attempts):
            self.requests[method] = self.requests.get(method, 0) + 1
            try:
                response = await self._http.request(method, path, json=json, params=params, headers=headers)
            except httpx.TransportError as exc:
                if attempt + 1 == self.retry.attempts:
                    raise APIError(503, "Unavailable", f"{method} {path}: {exc!r}") from exc
                await asyncio.sleep(self.retry.delay(attempt, None))
                continue
            retriable = response.status_code in RETRIED_STATUSES and not _is_already_exists(method, response) \
                and (retry_conflicts or response.status_code != 409)
            if not retriable or attempt + 1 == self.retry.attempts:
                return response
            logger.info("retrying %s %s after %s", method, path, response.status_code)
            await asyncio.sleep(self.retry.delay(attempt, response.headers.get("Retry-After")))
        raise AssertionError("unreachable")

    @staticmethod
    def _check(response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = {}
            raise APIError(response.status_code, body.get("reason") or response.reason_phrase,
                           body.get("message") or response.text[:500])
        return response.json() if response.content else {}

    async def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        response = await self._request("GET", resource_for(api_version, kind).path(namespace, name))
        if response.status_code == 404:
            return None
        return self._check(response)

    async def list(self, api_version: str, kind: str, namespace: str | None = None,
                   label_selector: str | None = None, field_selector: str | None = None) -> list[dict[str, Any]]:
        selectors = {"labelSelector": label_selector, "fieldSelector": field_selector}
        params = {key: value for key, value in selectors.items() if value}
        response = await self._request("GET", resource_for(api_version, kind).path(namespace), params=params)
        return list(self._check(response).get("items") or [])

    async def find(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object of that name, or None: read with a list (the operator's RBAC grants no ``get``)."""
        found = await self.list(api_version, kind, namespace, field_selector=f"metadata.name={name}")
        return found[0] if found else None

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply of an object we own (created when missing)."""
        meta = obj["metadata"]
        path = resource_for(obj["apiVersion"], obj["kind"]).path(meta.get("namespace"), meta["name"])
        params = {"fieldManager": FIELD_MANAGER, "force": "true"}
        response = await self._request("PATCH", path, json=obj, params=params, content_type=_CONTENT_TYPES["apply"])
        return self._check(response)

    async def patch(self, api_version: str, kind: str, namespace: str | None, name: str, patch: Mapping[str, Any],
                    subresource: str | None = None, retry_conflicts: bool = True) -> dict[str, Any]:
        """A merge patch. ``retry_conflicts=False`` for patches guarded by a resourceVersion: resending them
        cannot succeed, the caller re-reads instead."""
        path = resource_for(api_version, kind).path(namespace, name, subresource)
        response = await self._request("PATCH", path, json=patch, content_type=_CONTENT_TYPES["merge"],
                                       retry_conflicts=retry_conflicts)
        return self._check(response)

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = resource_for(obj["apiVersion"], obj["kind"]).path(meta.get("namespace"))
        return self._check(await self._request("POST", path, json=obj))

    async def delete(self, api_version: str, kind: str, namespace: str | None, name: str) -> bool:
        path = resource_for(api_version, kind).path(namespace, name)
        response = await self._request("DELETE", path, json={"propagationPolicy": "Background"})
        if response.status_code == 404:
            return False
        self._check(response)
        return True

    async def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str,
                         now: datetime.datetime) -> None:
        """A core/v1 Event about ``involved``; failures are logged, never raised (events are advisory)."""
        meta = involved.get("metadata", {})
        stamp = now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:12]}", "namespace": meta.get("namespace")},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"), "kind": involved.get("kind"),
                "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self.create(event)
        except APIError as exc:
            logger.warning("could not post event %s: %s", reason, exc)

    @property
    def writes(self) -> int:
        return sum(n for method, n in self.requests.items() if method in WRITE_METHODS)


def _ssl_context(connection: Connection) -> ssl.SSLContext | bool:
    """TLS verification (the cluster CA) and client certificates, as the kubeconfig says."""
    if connection.insecure:
        return False
    context = ssl.create_default_context(cafile=connection.ca_path)
    if connection.certificate_path:
        context.load_cert_chain(connection.certificate_path, connection.private_key_path)
    return context


def _is_already_exists(method: str, response: httpx.Response) -> bool:
    return method == "POST" and response.status_code == 409


def check_crds(connection: Connection) -> None:
    """Fail early, in one line saying what to check, when the API server cannot be reached, refuses the
    credentials or the RBAC, or does not serve the tensorfleet API (CRDs not installed)."""
    path = f"/apis/{API_GROUP}/{API_VERSION}"
    try:
        with httpx.Client(verify=_ssl_context(connection), auth=_BearerAuth(connection), timeout=15,
                          headers={"User-Agent": USER_AGENT}) as http:
            response = http.get(f"{connection.server}{path}")
    except httpx.TransportError as exc:
        raise SystemExit(f"cannot reach the API server at {connection.server}: {exc or type(exc).__name__}; "
                         "check --server or the kubeconfig's cluster, and the network to it") from None
    if response.is_success:
        return
    advice = {
        401: "check the credentials (the kubeconfig's user, or the service account's token)",
        403: "check the operator's RBAC (its service account needs the chart's ClusterRole)",
        404: f"the {API_GROUP}/{API_VERSION} API is not served: install the CRDs first "
             "(kubectl apply -R -f crds/, or helm install tensorfleet charts/tensorfleet)",
    }.get(response.status_code, "check the API server's health")
    raise SystemExit(f"{response.status_code} {response.reason_phrase} reading {path} from the API server at "
                     f"{connection.server}: {advice}")
