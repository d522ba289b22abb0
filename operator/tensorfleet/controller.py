"""kopf wiring: thin handlers around the one pure reconcile.

Level-based, as kopf's own reconciliation guide recommends: in-memory indices of the children
(fed by watch streams, no polling), raw event handlers that only poke a per-service trigger, and
one daemon per InferenceService that reconciles when poked and at least every ``resync_seconds``.
No kopf state-tracking handlers are used, so kopf itself writes nothing to a converged service.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from tensorfleet import API_GROUP, API_VERSION, diff, handlers, kube
from tensorfleet.api.types import InferenceService
from tensorfleet.autoscale import daemon as _autoscaler  # noqa: F401  (registers the autoscaler's handlers)
from tensorfleet.engines import controller as engines  # registers the Engine handlers and indices
from tensorfleet.metrics import OperatorMetrics
from tensorfleet.reconcile import Observed, Plan, child_key, owned_by, reconcile
from tensorfleet.render import labels
from tensorfleet.render.context import RenderContext
from tensorfleet.settings import OperatorSettings
from tensorfleet.settings import from_memo as settings_from_memo
from tensorfleet.triggers import Triggers, reconcile_loop

logger = logging.getLogger(__name__)
PLURAL = "inferenceservices"
FINALIZER = f"{API_GROUP}/finalizer"
CATCH_UP_SECONDS = 5.0  # after writing, wait this long at most for the watch to show our writes
_ISVC = f"{API_GROUP}/{API_VERSION}"


@dataclasses.dataclass
class Runtime:
    """Process-wide state of the operator, kept in kopf's memo."""

    settings: OperatorSettings
    client: kube.KubeClient
    ctx: RenderContext
    metrics: OperatorMetrics
    triggers: Triggers = dataclasses.field(default_factory=Triggers)


def find_connection(settings: OperatorSettings) -> kube.Connection | None:
    """``--server`` (no credentials), else what ``--cluster`` asks for (``kube.discover_connection``); None
    when nothing was named and nothing is there."""
    if settings.server:
        return kube.Connection(server=settings.server, insecure=True)
    return kube.discover_connection(settings.kubeconfig, settings.context, settings.cluster)


def connection_for(settings: OperatorSettings) -> kube.Connection:
    found = find_connection(settings)
    if found is None:
        raise kopf.LoginError("no in-cluster service account and no kubeconfig: nothing to connect to")
    return found


def operator_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """The kopf registry of one operator process: every handler of tensorfleet that ``settings`` allow."""
    return handlers.build(settings)


@handlers.declare(kopf.on.login)
def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
    conn = connection_for(settings_from_memo(memo))
    return kopf.ConnectionInfo(
        server=conn.server, ca_path=conn.ca_path, insecure=conn.insecure, scheme="Bearer" if conn.token else None,
        token=conn.current_token(), certificate_path=conn.certificate_path, private_key_path=conn.private_key_path,
        default_namespace=conn.default_namespace,
    )


@handlers.declare(kopf.on.startup)
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    ours = settings_from_memo(memo)
    if problems := ours.validate():  # kopf run, which skips tensorfleet run's check: stop rather than misbehave
        raise kopf.PermanentError("; ".join(problems))
    settings.persistence.finalizer = FINALIZER  # none is added; kopf removes this one, left by older versions
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.posting.enabled = False  # we post our own Events, on transitions only
    settings.watching.server_timeout = 300
    try:
        ctx = ours.render_context()
    except ValueError as exc:  # a bad resource-unit file: stop, rather than retry the startup every minute
        raise kopf.PermanentError(str(exc)) from None
    memo.runtime = Runtime(
        settings=ours,
        client=kube.KubeClient(connection_for(ours)),
        ctx=ctx,
        metrics=memo.get("metrics") or OperatorMetrics(),
    )


@handlers.declare(kopf.on.cleanup)
async def cleanup(memo: Any, **_: Any) -> None:
    runtime: Runtime | None = getattr(memo, "runtime", None)
    if runtime is not None:
        await runtime.client.aclose()


@handlers.declare(kopf.on.probe, id="api")
def probe_api(memo: Any, **_: Any) -> int:
    runtime: Runtime = memo.runtime
    return runtime.client.writes


# ---- children indices: watch streams keep them current; each change pokes its owner --------------------


def _index_child(body: kopf.Body, memo: Any) -> dict[tuple[str, str], dict[str, Any]] | None:
    owner = (body.metadata.labels or {}).get(labels.ISVC_LABEL)
    namespace = body.metadata.namespace
    if not owner or not namespace:
        return None
    runtime: Runtime | None = getattr(memo, "runtime", None)
    if runtime is not None:
        runtime.triggers.poke(namespace, owner)
    return {(namespace, owner): copy.deepcopy(dict(body))}


_OURS = {labels.MANAGED_BY: labels.MANAGER}
CHILD_INDICES = ("deployments_idx", "services_idx", "configmaps_idx", "pdbs_idx", "hpas_idx", "scaledobjects_idx")


@handlers.declare(kopf.index, "apps", "v1", "deployments", labels=_OURS)
async def deployments_idx(body: kopf.Body, memo: Any, **_: Any) -> Any:
    return _index_child(body, memo)


@handlers.declare(kopf.index, "", "v1", "services", labels=_OURS)
async def services_idx(body: kopf.Body, memo: Any, **_: Any) -> Any:
    return _index_child(body, memo)


@handlers.declare(kopf.index, "", "v1", "configmaps", labels=_OURS)
async def configmaps_idx(body: kopf.Body, memo: Any, **_: Any) -> Any:
    return _index_child(body, memo)


@handlers.declare(kopf.index, "policy", "v1", "poddisruptionbudgets", labels=_OURS)
async def pdbs_idx(body: kopf.Body, memo: Any, **_: Any) -> Any:
    return _index_child(body, memo)


# Only where the settings allow the mode: without RBAC for them kopf would stop the operator (tensorfleet.handlers).
@handlers.declare(kopf.index, "autoscaling", "v2", "horizontalpodautoscalers", labels=_OURS,
                  only_if=lambda settings: settings.autoscale_hpa)
async def hpas_idx(body: kopf.Body, memo: Any, **_: Any) -> Any:
    return _index_child(body, memo)


@handlers.declare(kopf.index, "keda.sh", "v1alpha1", "scaledobjects", labels=_OURS,  # without KEDA: empty
                  only_if=lambda settings: settings.autoscale_keda)
async def scaledobjects_idx(body: kopf.Body, memo: Any, **_: Any) -> Any:
    return _index_child(body, memo)


@handlers.declare(kopf.on.event, API_GROUP, API_VERSION, PLURAL)
async def inferenceservice_event(type: str | None, namespace: str | None, name: str | None, uid: str | None,
                                 memo: Any, **_: Any) -> None:
    runtime: Runtime | None = getattr(memo, "runtime", None)
    if runtime is None:
        return
    if type == "DELETED":  # no finalizer holds it back: its daemons end here (tensorfleet.handlers)
        runtime.triggers.deleted(uid)
    runtime.triggers.poke(namespace, name)


# ---- the reconcile daemon -------------------------------------------------------------------------


def _children(indices: Mapping[str, Any], key: tuple[str, str]) -> list[Mapping[str, Any]]:
    found: list[Mapping[str, Any]] = []
    for index in indices.values():
        found.extend(index.get(key, ()))
    return found


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@handlers.declare(kopf.daemon, API_GROUP, API_VERSION, PLURAL, cancellation_backoff=1.0, cancellation_timeout=10.0)
async def reconcile_daemon(stopped: Any, body: kopf.Body, namespace: str | None, name: str, memo: Any,
                           **kwargs: Any) -> None:
    runtime: Runtime = memo.runtime
    namespace = namespace or ""
    indices = {index: kwargs[index] for index in CHILD_INDICES if index in kwargs}  # optional ones may be absent
    engine_indices = {index: kwargs[index] for index in engines.ENGINE_INDICES}
    runtime.metrics.services.inc()
    try:
        with (runtime.triggers.until_deleted(stopped, str(body.metadata.uid)) as stop,
              runtime.triggers.listening(namespace, name) as trigger):
            await reconcile_loop(
                trigger, stop,
                lambda: reconcile_once(runtime, body, lambda: _children(indices, (namespace, name)),
                                       lambda: engines.observed_for_service(engine_indices, namespace)),
                resync_seconds=runtime.settings.resync_seconds, debounce_seconds=runtime.settings.debounce_seconds)
    finally:
        runtime.metrics.services.dec()
        if not runtime.triggers.listened(namespace, name):  # else the series are a new object's of that name
            runtime.metrics.forget_service(namespace, name)


async def reconcile_once(runtime: Runtime, body: Mapping[str, Any], children: Any, cluster: Any = dict) -> bool:
    """Observe, plan, write the difference. Returns False when a write failed (retried with backoff).

    ``cluster()`` returns the other ``Observed`` fields (GPU discovery and Engines, from their indices).
    Writes only while the service still exists (``kube.KubeClient.acting_for``): once it is gone, its
    daemons end, even when its DELETED event was lost."""
    snapshot = copy.deepcopy(dict(body))
    try:
        return await _reconcile_snapshot(dataclasses.replace(runtime, client=runtime.client.acting_for(snapshot)),
                                         snapshot, body, children, cluster)
    except kube.Vanished as exc:
        logger.info("%s: no more reconciles for it", exc)
        runtime.triggers.deleted(snapshot["metadata"].get("uid"))
        return True


async def _reconcile_snapshot(runtime: Runtime, snapshot: dict[str, Any], body: Mapping[str, Any], children: Any,
                              cluster: Any) -> bool:
    started = time.monotonic()
    observed = children()
    try:
        plan, writes = await _plan_and_write(runtime, snapshot, observed, cluster())
    except kube.Vanished:
        raise
    except Exception:  # never let one bad object take the operator down
        runtime.metrics.errors.labels(reason="exception").inc()
        logger.exception("reconcile crashed")
        return False
    try:
        status_replaced = await _write_status(runtime, snapshot, plan)
    except kube.APIError as exc:
        runtime.metrics.errors.labels(reason=str(exc.status)).inc()
        logger.warning("status update failed: %s", exc)
        return False
    finally:
        runtime.metrics.duration.observe(time.monotonic() - started)
    await _catch_up(writes.replaced, children, body, status_replaced)
    runtime.metrics.reconciles.labels(result="error" if writes.failures else "ok").inc()
    meta = snapshot["metadata"]
    desired = None if plan.errors else InferenceService.from_body(snapshot).spec.desired_replicas
    runtime.metrics.service_replicas(meta.get("namespace", ""), meta["name"], desired,
                                     int(plan.status.get("readyReplicas") or 0))
    return not writes.failures


async def _plan_and_write(runtime: Runtime, body: Mapping[str, Any], observed: list[Mapping[str, Any]],
                          extra: Mapping[str, Any]) -> tuple[Plan, Writes]:
    """Plan, write the children and the Engines, and when some write failed or a child's name was taken,
    plan again so that the status names every object that could not be written."""
    plan = reconcile(body, Observed(tuple(observed), **extra), runtime.ctx, _now())
    writes = await _write_children(runtime, body, plan, observed)
    try:
        await engines.write_engines(runtime.client, plan.engine_writes)
    except kube.APIError as exc:
        writes.failures.append((str(exc.status), f"Engines: {exc}"))
    if not writes.failures and not writes.conflicts:
        return plan, writes
    where = f"{body['metadata'].get('namespace')}/{body['metadata'].get('name')}"
    message = None
    if writes.failures:
        runtime.metrics.errors.labels(reason=writes.failures[0][0]).inc()
        message = "writing child objects failed: " + "; ".join(problem for _, problem in writes.failures)
        logger.warning("reconcile of %s: %s", where, message)
    if writes.conflicts:
        logger.warning("reconcile of %s: left alone, not controlled by it: %s", where, ", ".join(writes.conflicts))
    again = Observed(tuple(observed), apply_error=message, conflicts=tuple(writes.conflicts), **extra)
    return reconcile(body, again, runtime.ctx, _now()), writes


# Objects that stand in for one another: a mode change replaces an HPA by a ScaledObject (the same role).
_ROLES = {"HorizontalPodAutoscaler": "autoscaler", "ScaledObject": "autoscaler"}


def _role(obj: Mapping[str, Any]) -> str:
    return _ROLES.get(str(obj.get("kind")), str(obj.get("kind")))


@dataclasses.dataclass
class Writes:
    """One write pass: the resourceVersion each write replaced (for ``_catch_up``), what could not be written
    ((metric reason, message) each), the children whose name another object has, the roles of those
    objects, and the drift repaired."""

    replaced: dict[Any, str | None] = dataclasses.field(default_factory=dict)
    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    conflicts: list[str] = dataclasses.field(default_factory=list)
    failed_roles: set[str] = dataclasses.field(default_factory=set)
    drift: list[str] = dataclasses.field(default_factory=list)

    def failed(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        self.failures.append((reason, f"{obj['kind']} {obj['metadata']['name']}: {message}"))
        self.failed_roles.add(_role(obj))

    def conflict(self, obj: Mapping[str, Any]) -> None:
        self.conflicts.append(f"{obj['kind']} {obj['metadata']['name']}")
        self.failed_roles.add(_role(obj))

    def applied(self, obj: Mapping[str, Any], why: str, before: Mapping[str, Any] | None) -> None:
        self.replaced[child_key(obj)] = before.get("metadata", {}).get("resourceVersion") if before else None
        if why == "drift":
            self.drift.append(f"restored {obj['kind']} {obj['metadata']['name']}: it was changed outside tensorfleet")


async def _write_children(runtime: Runtime, body: Mapping[str, Any], plan: Plan,
                          observed: list[Mapping[str, Any]]) -> Writes:
    """Apply what differs, each child on its own (one refused child stops none of the others), then delete
    what is no longer wanted, except where the object that replaces it could not be written."""
    current: dict[Any, Mapping[str, Any]] = {child_key(c): c for c in observed}
    writes = Writes()
    for obj in plan.desired:
        await _write_child(runtime, obj, current.get(child_key(obj)), body["metadata"].get("uid"), writes)
    for stale in plan.prune:
        if _role(stale) not in writes.failed_roles:  # keep it serving until its replacement is written
            await _prune(runtime, stale, writes)
    for message in writes.drift:
        logger.info(message)
        await runtime.client.post_event(body, "Normal", "DriftRestored", message, _now())
    return writes


async def _write_child(runtime: Runtime, obj: Mapping[str, Any], before: Mapping[str, Any] | None,
                       uid: str | None, writes: Writes) -> None:
    """Apply ``obj`` where it differs from ``before`` (as the index shows it), never over an object that
    this service does not control: one labelled as ours, or one the index does not show, as the name of a
    child to create may already be taken (server-side apply with force would take it over)."""
    if before is not None and not owned_by(before, uid):
        writes.conflict(obj)
        return
    why = diff.needs_apply(obj, before)
    if why is None:
        return
    try:
        if why == "create":
            meta = obj["metadata"]
            before = await runtime.client.find(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])
            if before is not None and not owned_by(before, uid):
                writes.conflict(obj)
                return
        await runtime.client.apply(obj)
    except kube.APIError as exc:
        writes.failed(obj, str(exc.status), str(exc))
        return
    runtime.metrics.writes.labels(kind=obj["kind"], why=why).inc()
    writes.applied(obj, why, before)


async def _prune(runtime: Runtime, stale: Mapping[str, Any], writes: Writes) -> None:
    meta = stale["metadata"]
    try:
        await runtime.client.delete(stale["apiVersion"], stale["kind"], meta.get("namespace"), meta["name"])
    except kube.APIError as exc:
        writes.failed(stale, str(exc.status), f"deleting: {exc}")
        return
    runtime.metrics.writes.labels(kind=stale["kind"], why="prune").inc()


async def _write_status(runtime: Runtime, body: Mapping[str, Any], plan: Plan) -> str | None:
    """Patch the status subresource when it changed; the resourceVersion it replaced, or None."""
    current = body.get("status") or {}
    if all(current.get(k) == v for k, v in plan.status.items()):
        return None  # converged: no write
    meta = body["metadata"]
    await runtime.client.patch(_ISVC, "InferenceService", meta["namespace"], meta["name"],
                               {"status": plan.status}, subresource="status")
    runtime.metrics.writes.labels(kind="InferenceService", why="status").inc()
    for event in plan.events:
        await runtime.client.post_event(body, event.type, event.reason, event.message, _now())
    return str(meta.get("resourceVersion", ""))


async def _catch_up(replaced: Mapping[Any, str | None], children: Any, body: Mapping[str, Any],
                    status_replaced: str | None) -> None:
    """Wait until the watch streams show our writes (a newer version than the one each replaced),
    so the next pass does not write the same thing again."""
    deadline = time.monotonic() + CATCH_UP_SECONDS
    while time.monotonic() < deadline:
        seen = {child_key(c): c.get("metadata", {}).get("resourceVersion") for c in children()}
        children_seen = all(key in seen and seen[key] != rv for key, rv in replaced.items())
        body_rv = body.get("metadata", {}).get("resourceVersion")
        body_seen = status_replaced is None or body_rv != status_replaced
        if children_seen and body_seen:
            return
        await asyncio.sleep(0.05)
