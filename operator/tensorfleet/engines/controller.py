"""kopf wiring for engines: GPU discovery, Engine/Job/Pod indices, one daemon per Engine, and the hooks the
InferenceService daemon calls (what it observes about GPUs and Engines, and the Engine writes it plans).

Thin like ``tensorfleet.controller``: every decision is in ``engines.reconcile`` and ``engines.serving``.
A converged Engine makes no API writes: status is patched only when it changed, Jobs are created only
when an attempt starts, and finished Jobs are deleted once, after their outcome is in status.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import json
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from tensorfleet import API_GROUP, API_VERSION, handlers, kube
from tensorfleet.engines import discovery, jobs, serving
from tensorfleet.engines.fingerprint import ENGINE_LABEL
from tensorfleet.engines.reconcile import CorruptionReport, EngineContext, EngineObserved, reconcile_engine
from tensorfleet.engines.storeref import StoreRef
from tensorfleet.render import labels
from tensorfleet.settings import from_memo as settings_from_memo
from tensorfleet.triggers import Triggers, reconcile_loop

logger = logging.getLogger(__name__)
_API = f"{API_GROUP}/{API_VERSION}"
_OURS = {labels.MANAGED_BY: labels.MANAGER}
ENGINE_INDICES = ("engines_idx", "gpu_nodes_idx")


@dataclasses.dataclass
class EngineRuntime:
    ctx: EngineContext
    triggers: Triggers = dataclasses.field(default_factory=Triggers)


def engine_context(settings: Any) -> EngineContext:
    default = StoreRef.parse_default(settings.engine_store, settings.engine_store_endpoint or "",
                                     settings.engine_store_region or "", settings.engine_store_secret or "")
    return EngineContext(
        default_store=default,
        job_settings=jobs.JobSettings(
            builder_image_template=settings.engine_builder_image, retries=settings.engine_build_retries,
            requests={"cpu": settings.engine_build_cpu, "memory": settings.engine_build_memory,
                      "ephemeral-storage": settings.engine_build_ephemeral_storage}),
        retry_base_seconds=settings.engine_retry_base_seconds,
        retry_max_seconds=settings.engine_retry_max_seconds,
    )


def _poke_services(memo: Any, namespace: str | None = None) -> None:
    runtime = getattr(memo, "runtime", None)
    if runtime is not None:
        runtime.triggers.poke_all(namespace)


def _engines(memo: Any) -> EngineRuntime | None:
    return getattr(memo, "engines", None)


@handlers.declare(kopf.on.startup)
async def engines_startup(memo: Any, **_: Any) -> None:
    """Created once in the operator's memo at startup: kopf gives every object a shallow copy of that memo,
    so state created later, in one object's handler, would not be shared with the others."""
    memo.engines = EngineRuntime(engine_context(settings_from_memo(memo)))


# ---- indices ------------------------------------------------------------------------------------------


@handlers.declare(kopf.index, "", "v1", "nodes")
async def gpu_nodes_idx(body: kopf.Body, memo: Any, **_: Any) -> Any:
    gpus = discovery.node_gpus(body)
    _poke_services(memo)  # a product appearing or leaving changes which Deployments a service has
    return {"gpus": gpus} if gpus is not None else None


@handlers.declare(kopf.index, API_GROUP, API_VERSION, "engines")
async def engines_idx(body: kopf.Body, namespace: str | None, name: str | None, memo: Any, **_: Any) -> Any:
    _poke_services(memo, namespace)
    engines = _engines(memo)
    if engines is not None:
        engines.triggers.poke(namespace, name)
    return {namespace: copy.deepcopy(dict(body))} if namespace else None


@handlers.declare(kopf.on.event, API_GROUP, API_VERSION, "engines")
async def engine_event(type: str | None, uid: str | None, memo: Any, **_: Any) -> None:
    """No finalizer holds a deleted Engine back: its daemon ends here (``tensorfleet.handlers``)."""
    engines = _engines(memo)
    if engines is not None and type == "DELETED":
        engines.triggers.deleted(uid)


def _index_by_engine(body: kopf.Body, namespace: str | None, memo: Any) -> Any:
    """Objects labelled with an Engine's name, by (namespace, engine); each change pokes that Engine."""
    engine = (body.metadata.labels or {}).get(ENGINE_LABEL)
    if not engine or not namespace:
        return None
    engines = _engines(memo)
    if engines is not None:
        engines.triggers.poke(namespace, engine)
    return {(namespace, engine): copy.deepcopy(dict(body))}


@handlers.declare(kopf.index, "batch", "v1", "jobs", labels=_OURS)
async def engine_jobs_idx(body: kopf.Body, namespace: str | None, memo: Any, **_: Any) -> Any:
    return _index_by_engine(body, namespace, memo)


@handlers.declare(kopf.index, "", "v1", "pods", labels=_OURS)
async def engine_pods_idx(body: kopf.Body, namespace: str | None, memo: Any, **_: Any) -> Any:
    """Build pods (their termination message) and serving pods (an engine-fetch that found corruption)."""
    return _index_by_engine(body, namespace, memo)


# ---- hooks for the InferenceService daemon -------------------------------------------------------------


def observed_for_service(indices: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    """The ``Observed`` fields engines contribute: GPU products present (and those only on cordoned nodes),
    their nodes, their compute capability, Engines."""
    nodes = list(indices["gpu_nodes_idx"].get("gpus", ()))
    inventory = discovery.Inventory.from_nodes(nodes)
    return {
        "gpu_products": inventory.names,
        "cordoned_products": inventory.cordoned_products(),
        "gpu_nodes": tuple(nodes),
        "compute_capabilities": inventory.compute_capabilities(),
        "engines": tuple(indices["engines_idx"].get(namespace, ())),
    }


async def write_engines(client: kube.KubeClient, writes: tuple[serving.EngineWrite, ...]) -> None:
    """Create, share or release Engines as the service's plan says. Conflicts wait for the next pass."""
    for write in writes:
        try:
            if write.action == "create":
                await client.create(dict(write.body or {}))
            elif write.action == "patch":
                await client.patch(_API, "Engine", write.namespace, write.name, dict(write.body or {}),
                                   retry_conflicts=False)
            else:
                await client.delete(_API, "Engine", write.namespace, write.name)
        except kube.APIError as exc:
            if exc.status != 409:  # 409: created meanwhile, or changed under us; the next pass sees it
                raise


# ---- the Engine daemon ---------------------------------------------------------------------------------


def _corruption_reports(pods: list[Mapping[str, Any]]) -> tuple[CorruptionReport, ...]:
    reports = []
    for pod in pods:
        result = jobs.pod_result(pod, serving.FETCH_CONTAINER)
        if result is None or result.report.get("result") != "corrupt":
            continue
        reports.append(CorruptionReport(pod=result.pod, finished_at=result.finished_at,
                                        sha256=str(result.report.get("sha256") or ""),
                                        message=str(result.report.get("message") or "")))
    return tuple(reports)


def _observe(kwargs: Mapping[str, Any], namespace: str, name: str) -> EngineObserved:
    key = (namespace, name)
    pods = list(kwargs["engine_pods_idx"].get(key, ()))
    return EngineObserved(jobs=tuple(kwargs["engine_jobs_idx"].get(key, ())),
                          pods=tuple(p for p in pods if jobs.job_name_of(p)),
                          corruption=_corruption_reports(pods))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@handlers.declare(kopf.daemon, API_GROUP, API_VERSION, "engines", cancellation_backoff=1.0, cancellation_timeout=10.0)
async def engine_daemon(stopped: Any, body: kopf.Body, namespace: str | None, name: str, memo: Any,
                        **kwargs: Any) -> None:
    runtime = memo.runtime
    engines = _engines(memo)
    assert engines is not None
    namespace = namespace or ""
    runtime.metrics.watch_engine(namespace, str(((body.get("spec") or {}).get("gpu") or {}).get("product") or ""))
    with (engines.triggers.until_deleted(stopped, str(body.metadata.uid)) as stop,
          engines.triggers.listening(namespace, name) as trigger):
        await reconcile_loop(
            trigger, stop,
            lambda: reconcile_engine_once(runtime, engines, body, lambda: _observe(kwargs, namespace, name)),
            resync_seconds=runtime.settings.resync_seconds, debounce_seconds=runtime.settings.debounce_seconds)


async def reconcile_engine_once(runtime: Any, engines: EngineRuntime, body: Mapping[str, Any], observe: Any) -> bool:
    """Observe, plan, write. Writes only while the Engine still exists (``kube.KubeClient.acting_for``): once it
    is gone, its daemon ends, even when its DELETED event was lost."""
    snapshot = copy.deepcopy(dict(body))
    meta = snapshot["metadata"]
    client = runtime.client.acting_for(snapshot)
    try:
        plan = reconcile_engine(snapshot, observe(), engines.ctx, _now())
        current = snapshot.get("status") or {}
        changed = {k: v for k, v in plan.status.items() if current.get(k) != v}
        if changed:  # status first: a finished Job is deleted only once its outcome is recorded
            await client.patch(_API, "Engine", meta["namespace"], meta["name"], {"status": changed},
                               subresource="status")
            runtime.metrics.writes.labels(kind="Engine", why="status").inc()
            product = str(((snapshot.get("spec") or {}).get("gpu") or {}).get("product") or "")
            for outcome in plan.finished:  # counted once: with the status write that records it
                runtime.metrics.engine_build(meta["namespace"], product, outcome.result, outcome.seconds)
            for event in plan.events:
                await client.post_event(snapshot, event.type, event.reason, event.message, _now())
        if plan.create is not None and not any(
                j["metadata"]["name"] == plan.create["metadata"]["name"] for j in observe().jobs):
            await _create_job(runtime, client, plan.create)
        for job_name in plan.delete:
            await client.delete("batch/v1", "Job", meta["namespace"], job_name)
            runtime.metrics.writes.labels(kind="Job", why="prune").inc()
    except kube.Vanished as exc:
        logger.info("%s: no more reconciles for it", exc)
        engines.triggers.deleted(meta.get("uid"))
        return True
    except kube.APIError as exc:
        logger.warning("reconcile of Engine %s/%s failed: %s", meta.get("namespace"), meta.get("name"), exc)
        return False
    except Exception:
        logger.exception("Engine reconcile crashed")
        return False
    await _catch_up(body, meta.get("resourceVersion"), bool(changed))
    return True


async def _create_job(runtime: Any, client: kube.KubeClient, job: Mapping[str, Any]) -> None:
    try:
        await client.create(job)
        runtime.metrics.writes.labels(kind="Job", why="create").inc()
    except kube.APIError as exc:
        if exc.status != 409:  # AlreadyExists: the index had not shown it yet
            raise
        logger.debug("Job %s already exists", json.dumps(job["metadata"]["name"]))


async def _catch_up(body: Mapping[str, Any], replaced: str | None, wrote_status: bool) -> None:
    """After a status write, wait (briefly) for the watch to show it, so the next pass does not repeat it."""
    if not wrote_status:
        return
    for _ in range(100):
        if body.get("metadata", {}).get("resourceVersion") != replaced:
            return
        await asyncio.sleep(0.05)
