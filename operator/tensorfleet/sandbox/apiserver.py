"""An embedded Kubernetes API for the quickstart and the integration tests.

It is kmock's ``KubernetesEmulator`` (an in-memory store behind the Kubernetes REST paths, with
discovery, list and watch) plus the API-server behaviour the operator depends on and the plain
emulator leaves out:

* metadata the server owns: ``uid``, ``resourceVersion`` (changes on every real change, not on no-ops),
  ``generation`` (bumped when anything but metadata and status changes), ``creationTimestamp``;
* the ``status`` and ``scale`` subresources: status goes only through ``/status``, replicas through ``/scale``;
* JSON merge patches, and server-side apply approximated for a single field manager
  (the applied object's content replaces ours; it is no replacement for real SSA semantics);
* optimistic concurrency on ``metadata.resourceVersion``; 409 AlreadyExists on duplicate creates;
* for tensorfleet's own CRDs: defaults and OpenAPI/CEL validation from the CRD (422 Invalid);
* finalizers and the garbage collector: deleting an owner deletes what it owns;
* ``labelSelector`` and ``fieldSelector`` (``metadata.name``, ``metadata.namespace``) on lists;
* injected faults (``inject_fault``) that reject a request before it changes anything;
* a record of every resource request as the RBAC authorizer sees it (``requests``: verb, API group,
  resource, subresource, namespace), so tests can prove the chart grants exactly what the code uses.

It is not a cluster: nothing schedules pods or runs controllers (see ``sandbox.kubelet``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import datetime
import gzip
import importlib.resources
import itertools
import re
import threading
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import enums, k8s, parsing, rendering

from tensorfleet.api import crds

T = TypeVar("T")
_kmock_parse_path = parsing.parse_path


def _parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 cannot parse the Namespace paths /api/v1/namespaces[/NAME] (it reads "namespaces" as
    the start of a namespaced path); kopf lists and watches them when it serves named namespaces."""
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        name = parts[3] if len(parts) == 4 else None
        return parsing.ParsedPath(group="", version="v1", plural="namespaces", name=name)
    return _kmock_parse_path(path)


parsing.parse_path = _parse_path  # process-wide, but only the sandbox (tests, quickstart) imports kmock
_SUBRESOURCE_OWNERS = {"status", "scale"}
_SERVER_FIELDS = ("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp")


@dataclasses.dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    remaining: int


@dataclasses.dataclass(frozen=True)
class APIRequest:
    """One resource request, as the API server's RBAC authorizer sees it."""

    verb: str  # get, list, watch, create, update, patch, delete, deletecollection
    group: str  # "" for the core group
    resource: str  # the plural, e.g. deployments
    subresource: str  # "" when none, e.g. status or scale
    namespace: str | None  # None for cluster-scoped requests and requests across all namespaces
    name: str | None  # from the URL: None for lists, collection watches and POST creates
    user_agent: str  # who asked: kopf/VERSION, tensorfleet/VERSION, or a test client


def rbac_verb(method: str, name: str | None, params: Mapping[str, str]) -> str:
    """The RBAC verb of an HTTP request on a resource path (as kube-apiserver's request info resolver does)."""
    if method == "GET":
        if params.get("watch", "").lower() in ("1", "true"):
            return "watch"
        return "get" if name else "list"
    if method == "DELETE":
        return "delete" if name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, reason: str, message: str, causes: list[dict[str, str]] | None = None) -> k8s.KubernetesError:
    details: dict[str, Any] = {"causes": causes} if causes else {}
    return k8s.KubernetesError(status=status, reason=reason, message=message, details=details)


@attrs.define(kw_only=True)
class EmulatedAPIServer(kmock.KubernetesEmulator):
    faults: list[Fault] = attrs.field(factory=list)
    writes: list[tuple[str, str]] = attrs.field(factory=list)  # (method, path) of every write received
    write_ports: list[int | None] = attrs.field(factory=list)  # the port each write came in on (one per client)
    requests_by_port: collections.Counter[int | None] = attrs.field(factory=collections.Counter)
    requests: list[APIRequest] = attrs.field(factory=list)  # every resource request, as RBAC sees it
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # kmock's bundled discovery data for the built-in resources (read directly: load_bundled() uses
        # an importlib API deprecated since Python 3.11).
        bundled = importlib.resources.files("kmock._internal") / "resources.json.gz"
        self.resources.load_data(gzip.decompress(bundled.read_bytes()))
        for crd in crds.definitions():
            names, group = crd["spec"]["names"], crd["spec"]["group"]
            for version in crd["spec"]["versions"]:
                self.resources[f"{group}/{version['name']}/{names['plural']}"] = kmock.ResourceInfo(
                    kind=names["kind"], singular=names.get("singular"), namespaced=crd["spec"]["scope"] == "Namespaced",
                    shortnames=set(names.get("shortNames", ())), categories=set(names.get("categories", ())),
                    verbs={"get", "list", "watch", "create", "update", "patch", "delete"},
                    subresources=set(version.get("subresources", {})),
                )
        for plural, kind in (("clusterkopfpeerings", "ClusterKopfPeering"), ("kopfpeerings", "KopfPeering")):
            self.resources[f"kopf.dev/v1/{plural}"] = kmock.ResourceInfo(
                kind=kind, namespaced=plural == "kopfpeerings", verbs={"get", "list", "watch", "patch", "create"})

    # ---- faults ---------------------------------------------------------------------------------

    def inject_fault(self, method: str, path: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``method`` and the ``path`` regex with ``status``."""
        self.faults.append(Fault(method.upper(), re.compile(path), status, times))

    def _take_fault(self, request: rendering.Request) -> Fault | None:
        for fault in self.faults:
            if fault.remaining > 0 and fault.method == str(request.method.value).upper() \
                    and fault.path.search(request.url.path):
                fault.remaining -= 1
                return fault
        return None

    # ---- request handling -----------------------------------------------------------------------

    def _record(self, request: rendering.Request, method: str, verb: str | None = None) -> None:
        resource: Any = request.resource
        if not resource.plural:
            return  # API discovery (/api/v1, /apis/GROUP/VERSION): not a resource request
        self.requests.append(APIRequest(
            verb=verb or rbac_verb(method, request.name, request.params),
            group=resource.group or "", resource=resource.plural, subresource=request.subresource or "",
            namespace=request.namespace, name=request.name,
            user_agent=request.headers.get("User-Agent", "")))

    def _record_owner_checks(self, request: rendering.Request) -> None:
        """What the OwnerReferencesPermissionEnforcement admission plugin (OpenShift's default) asks the RBAC
        authorizer: an owner reference with ``blockOwnerDeletion`` needs ``update`` on the owner's finalizers."""
        body = request.data if isinstance(request.data, dict) else {}
        for ref in (body.get("metadata") or {}).get("ownerReferences") or ():
            if not ref.get("blockOwnerDeletion"):
                continue
            group = str(ref.get("apiVersion", "")).rpartition("/")[0]
            self.requests.append(APIRequest(
                verb="update", group=group, resource=self._plural(group, str(ref.get("kind"))),
                subresource="finalizers", namespace=request.namespace, name=ref.get("name"),
                user_agent=request.headers.get("User-Agent", "")))

    def _plural(self, group: str, kind: str) -> str:
        items: Any = self.resources.items()
        return next((str(res.plural) for res, info in items if res.group == group and info.kind == kind), kind.lower())

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        method = str(request.method.value).upper()
        self.requests_by_port[request.url.port] += 1
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            self.writes.append((method, request.url.path))
            self.write_ports.append(request.url.port)
        if request.resource is not None:
            self._record(request, method)
            if method in ("POST", "PUT", "PATCH"):
                self._record_owner_checks(request)
        fault = self._take_fault(request)
        if fault is not None:
            reason = {409: "Conflict", 429: "TooManyRequests"}.get(fault.status, "InternalError")
            return await self._render_error(_error(fault.status, reason, "injected fault"))
        if request.resource is None:
            return await k8s.KubernetesScaffold._handle(self, request)
        try:
            if request.subresource == "scale":
                return await self._scale(request)
            async with self._lock:
                events = self._mutate(request)
        except k8s.KubernetesError as exc:
            return await self._render_error(exc)
        for resource, event in events:
            await self._buses[resource].put(event)
        created = any(event["type"] == "ADDED" for _, event in events)
        if created and method == "PATCH":
            # A server-side apply that creates the object is authorized for "create" as well as "patch".
            self._record(request, method, verb="create")
        try:
            direct = await self._answer(request, events)
        except k8s.KubernetesError as exc:
            return await self._render_error(exc)
        if direct is not None:
            return direct
        response = await k8s.KubernetesScaffold._handle(self, request)  # watches, and whatever else
        if created and response.status == 200 and not response.prepared:
            response.set_status(201)  # the API server answers a create with 201 Created
        return response

    async def _answer(self, request: rendering.Request, events: list[tuple[Any, dict[str, Any]]]
                      ) -> aiohttp.web.StreamResponse | None:
        """Plain reads and writes, answered without kmock's request routing (it evaluates its whole DSL
        on every request, which dominated the emulator's time at a few hundred objects). Watches and
        anything unusual still go through kmock."""
        action = request.action
        if request.resource is None or not request.resource.plural:
            return None  # API discovery (/api/v1, /apis/GROUP/VERSION): kmock serves it
        if action == enums.action.LIST:
            return aiohttp.web.json_response(await self._serve_list(request))
        if action == enums.action.CREATE and events:
            return aiohttp.web.json_response(events[0][1]["object"], status=201)
        if action not in (enums.action.FETCH, enums.action.UPDATE, enums.action.DELETE) or request.name is None:
            return None
        key: Any = (request.resource, request.namespace, request.name)
        async with self._lock:
            obj = self._objects[key] if key in self._objects else None  # noqa: SIM401 (not a dict)
            if obj is None or (obj.deleted and action == enums.action.FETCH):
                raise _error(404, "NotFound", f'{request.resource.plural if request.resource else ""} '
                                              f'"{request.name}" not found')
            raw = copy.deepcopy(obj.last.raw)
        return aiohttp.web.json_response(raw)

    def _mutate(self, request: rendering.Request) -> list[tuple[Any, dict[str, Any]]]:
        action = request.action
        if action == enums.action.CREATE:
            return self._create(request.resource, request.namespace, request.data)
        if action == enums.action.UPDATE and request.name is not None:
            return self._update(request)
        if action == enums.action.DELETE and request.name is not None:
            return self._delete((request.resource, request.namespace, request.name))
        return []

    def _namespaced(self, resource: Any) -> bool:
        info: Any = self.resources.get(resource)
        return bool(info.namespaced) if info is not None and info.namespaced is not None else True

    def _has_subresource(self, resource: Any, name: str) -> bool:
        info: Any = self.resources.get(resource)
        return bool(info is not None and name in info.subresources)

    def _create(self, resource: Any, namespace: str | None, data: Any) -> list[tuple[Any, dict[str, Any]]]:
        if not isinstance(data, dict):
            raise _error(400, "BadRequest", "the request body must be a JSON object")
        obj = copy.deepcopy(data)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = f"{meta['generateName']}{uuid.uuid4().hex[:5]}"
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        namespace = (namespace or meta.get("namespace")) if self._namespaced(resource) else None
        key = (resource, namespace, meta["name"])
        if key in self._objects and not self._objects[key].deleted:
            raise _error(409, "AlreadyExists", f'{resource.plural} "{meta["name"]}" already exists')
        obj = self._admit(obj, None)
        if self._has_subresource(resource, "status"):
            obj.pop("status", None)
        meta = obj["metadata"]
        for field in _SERVER_FIELDS:
            meta.pop(field, None)
        if namespace:
            meta["namespace"] = namespace
        meta.update(uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)), generation=1,
                    creationTimestamp=_now())
        if key in self._objects:
            self._objects[key].create(obj)
        else:
            self._objects[key] = obj
        return [(resource, {"type": "ADDED", "object": copy.deepcopy(obj)})]

    def _update(self, request: rendering.Request) -> list[tuple[Any, dict[str, Any]]]:
        resource: Any = request.resource
        key: Any = (resource, request.namespace, request.name)
        content_type = request.headers.get("Content-Type", "").split(";")[0]
        exists = key in self._objects and not self._objects[key].deleted
        if not exists:
            if content_type == "application/apply-patch+yaml" and request.subresource is None:
                return self._create(resource, request.namespace, request.data)
            raise _error(404, "NotFound", f'{resource.plural} "{request.name}" not found')
        old = copy.deepcopy(self._objects[key].raw)
        new = self._changed(request, old, content_type)
        if new == old:
            return []  # a no-op write changes nothing, not even the resourceVersion
        self._objects[key].history.append(new)
        meta = new["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._delete(key)
        return [(resource, {"type": "MODIFIED", "object": copy.deepcopy(new)})]

    def _changed(self, request: rendering.Request, old: dict[str, Any], content_type: str) -> dict[str, Any]:
        data = request.data
        if content_type == "application/json-patch+json":
            data = _json_patched(old, data)
        if not isinstance(data, dict):
            raise _error(415, "UnsupportedMediaType", "the body must be a JSON object or a JSON patch")
        sent_version = data.get("metadata", {}).get("resourceVersion")
        if sent_version and sent_version != old["metadata"].get("resourceVersion"):
            raise _error(409, "Conflict",
                         "the object has been modified; please apply your changes to the latest version")
        if request.subresource == "status":
            new = copy.deepcopy(old)
            if content_type == "application/json-patch+json" or request.method == enums.method.PUT:
                new["status"] = copy.deepcopy(data.get("status"))
            else:
                new["status"] = _merge(old.get("status") or {}, data.get("status") or {})
        else:
            if request.method == enums.method.PUT or content_type == "application/json-patch+json":
                new = copy.deepcopy(data)
            elif content_type == "application/apply-patch+yaml":
                new = _apply(old, data)
            else:
                new = _merge(old, data)
            if self._has_subresource(request.resource, "status"):
                new["status"] = copy.deepcopy(old.get("status"))
                if new["status"] is None:
                    new.pop("status")
            new = self._admit(new, old)
        meta = new.setdefault("metadata", {})
        for field in _SERVER_FIELDS:
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        if _spec_of(new) != _spec_of(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if new != old:
            meta["resourceVersion"] = str(next(self._versions))
        return new

    def _admit(self, obj: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults and schema/CEL validation for tensorfleet's own resources."""
        if crds.kind_of(obj) is None:
            return obj
        errors = crds.validate(obj, old)
        if errors:
            kind, name = obj.get("kind"), obj.get("metadata", {}).get("name")
            causes = [{"field": e.path, "message": e.message} for e in errors]
            message = f'{kind}.tensorfleet.io "{name}" is invalid: ' + ", ".join(str(e) for e in errors)
            raise _error(422, "Invalid", message, causes)
        return crds.default(obj)

    def _delete(self, key: Any) -> list[tuple[Any, dict[str, Any]]]:
        resource = key[0]
        if key not in self._objects or self._objects[key].deleted:
            raise _error(404, "NotFound", f'{resource.plural} "{key[2]}" not found')
        obj = self._objects[key]
        meta = obj.get("metadata", {})
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return []
            obj.patch({"metadata": {"deletionTimestamp": _now(), "resourceVersion": str(next(self._versions))}})
            return [(resource, {"type": "MODIFIED", "object": copy.deepcopy(obj.raw)})]
        raw = copy.deepcopy(obj.raw)
        obj.delete()
        events = [(resource, {"type": "DELETED", "object": raw})]
        return events + self._collect_garbage(meta.get("uid"))

    def _collect_garbage(self, owner_uid: str | None) -> list[tuple[Any, dict[str, Any]]]:
        """Delete what the deleted object owned (background propagation of the garbage collector)."""
        events: list[tuple[Any, dict[str, Any]]] = []
        for key, obj in list(self._objects.items()):
            if obj.deleted:
                continue
            refs = obj.get("metadata", {}).get("ownerReferences") or []
            if owner_uid and any(ref.get("uid") == owner_uid for ref in refs):
                events.extend(self._delete(key))
        return events

    # ---- scale subresource ----------------------------------------------------------------------

    async def _scale(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        resource: Any = request.resource
        key: Any = (resource, request.namespace, request.name)
        events = []
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                raise _error(404, "NotFound", f'{resource.plural} "{request.name}" not found')
            if request.method in (enums.method.PATCH, enums.method.PUT):
                replicas = (request.data or {}).get("spec", {}).get("replicas")
                if not isinstance(replicas, int) or replicas < 0:
                    raise _error(422, "Invalid", "spec.replicas: Invalid value: must be a non-negative integer")
                old = copy.deepcopy(self._objects[key].raw)
                new = copy.deepcopy(old)
                new.setdefault("spec", {})["replicas"] = replicas
                new = self._admit(new, old)
                if new != old:
                    new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
                    new["metadata"]["resourceVersion"] = str(next(self._versions))
                    self._objects[key].history.append(new)
                    events.append({"type": "MODIFIED", "object": copy.deepcopy(new)})
            obj = self._objects[key].raw
        for event in events:
            await self._buses[resource].put(event)
        return aiohttp.web.json_response(_scale_of(obj))

    # ---- lists with label selectors -------------------------------------------------------------

    async def _serve_list(self, request: rendering.Request) -> rendering.Payload:
        if request.resource not in self._get_resources():
            raise k8s.KubernetesResourceNotFoundError()
        matches = _selector(request.params.get("labelSelector", ""))
        named = _field_selector(request.params.get("fieldSelector", ""))
        async with self._lock:
            items = [
                copy.deepcopy(obj.raw) for (resource, namespace, _), obj in self._objects.items()
                if resource == request.resource and not obj.deleted
                and (request.namespace is None or namespace == request.namespace)
                and matches(obj.get("metadata", {}).get("labels") or {}) and named(obj.get("metadata", {}))
            ]
        return {"kind": "List", "apiVersion": "v1",
                "metadata": {"resourceVersion": str(next(self._versions))}, "items": items}


def _json_patched(old: dict[str, Any], ops: Any) -> dict[str, Any]:
    """RFC 6902: the whole patched object, then treated like a PUT of it (a failed test is a 422)."""
    if not isinstance(ops, list):
        raise _error(400, "BadRequest", "a JSON patch must be a list of operations")
    try:
        patched = jsonpatch.apply_patch(old, ops)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise _error(422, "Invalid", f"the JSON patch test failed: {exc}") from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise _error(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from None
    return dict(patched)


def _spec_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge(result.get(key), value)
    return result


def _apply(old: dict[str, Any], applied: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply for one field manager: its content replaces ours, other metadata merges."""
    new = {k: copy.deepcopy(v) for k, v in applied.items() if k != "metadata"}
    if "status" in old:
        new["status"] = copy.deepcopy(old["status"])
    meta = copy.deepcopy(old["metadata"])
    for field in ("labels", "annotations"):
        if field in applied.get("metadata", {}):
            meta[field] = {**(meta.get(field) or {}), **applied["metadata"][field]}
    if "ownerReferences" in applied.get("metadata", {}):
        meta["ownerReferences"] = copy.deepcopy(applied["metadata"]["ownerReferences"])
    new["metadata"] = meta
    return new


def _scale_of(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if k in meta},
        "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
        "status": {"replicas": (obj.get("status") or {}).get("replicas", 0),
                   "selector": (obj.get("status") or {}).get("selector", "")},
    }


def _selector(text: str) -> Callable[[Mapping[str, str]], bool]:
    """Equality-based label selectors: ``a=b,c!=d,e`` (the forms the operator uses)."""
    clauses = [c.strip() for c in text.split(",") if c.strip()]

    def matches(found: Mapping[str, str]) -> bool:
        for clause in clauses:
            if "!=" in clause:
                key, value = clause.split("!=", 1)
                if found.get(key.strip()) == value.strip():
                    return False
            elif "=" in clause:
                key, value = clause.replace("==", "=").split("=", 1)
                if found.get(key.strip()) != value.strip():
                    return False
            elif clause.startswith("!"):
                if clause[1:] in found:
                    return False
            elif clause not in found:
                return False
        return True

    return matches


def _field_selector(text: str) -> Callable[[Mapping[str, Any]], bool]:
    """``metadata.name=x,metadata.namespace=y``: the field selectors every resource supports."""
    wanted: dict[str, str] = {}
    for clause in filter(None, (c.strip() for c in text.split(","))):
        field, equals, value = clause.replace("==", "=").partition("=")
        if not equals or field not in ("metadata.name", "metadata.namespace"):
            raise _error(400, "BadRequest", f'"{clause}" is not a supported field selector')
        wanted[field.removeprefix("metadata.")] = value
    return lambda meta: all(meta.get(key) == value for key, value in wanted.items())


class EmulatorThread:
    """Runs an ``EmulatedAPIServer`` on a loopback port in a background thread with its own event loop."""

    def __init__(self, ports: int = 1) -> None:
        self.server = EmulatedAPIServer()
        self.ports = ports
        self.urls: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kubernetes-emulator", daemon=True)
        self.url = ""

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        if not self._started.wait(timeout=30):
            raise RuntimeError("the Kubernetes API emulator did not start within 30 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with self.server, contextlib.AsyncExitStack() as stack:
            # Several ports for one server, so tests can tell two clients' requests apart.
            for _ in range(self.ports):
                http = await stack.enter_async_context(kmock.Server(self.server))
                self.urls.append(str(http.url).rstrip("/"))
            self.url = self.urls[0]
            self._started.set()
            await self._stop.wait()

    def call(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
        """Run a coroutine on the emulator's loop (its state is not thread-safe) and return the result."""
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(timeout)

    def delete_unwatched(self, api_version: str, plural: str, namespace: str, name: str) -> None:
        """Delete an object as a client's DELETE would (the garbage collector removes what it owned, and watches
        see that), but let no watch see the object's own DELETED event: what a watch that relists after
        "410 Gone" misses (the object is simply not listed any more; kopf reports no deletion then)."""
        group, _, version = api_version.rpartition("/")
        resource = kmock.resource(group=group, version=version, plural=plural)

        async def delete() -> None:
            async with self.server._lock:
                events = self.server._delete((resource, namespace, name))
            for dependent, event in events[1:]:  # the first is the object's own
                await self.server._buses[dependent].put(event)

        self.call(delete)

    def objects(self, api_version: str, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Snapshot of the live objects of one resource, taken on the emulator's loop."""
        group, _, version = api_version.rpartition("/")
        resource = kmock.resource(group=group, version=version, plural=plural)

        async def snapshot() -> list[dict[str, Any]]:
            async with self.server._lock:
                return [copy.deepcopy(obj.raw) for (res, ns, _), obj in self.server.objects.items()
                        if res == resource and not obj.deleted and (namespace is None or ns == namespace)]

        return self.call(snapshot)
