"""What an InferenceService needs from Engines (pure): which Engines to create or reuse, which GPU products
may serve (their Engine is Ready), the init containers that fetch and verify, and the status they show.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tensorfleet.api.schema import FieldError
from tensorfleet.api.types import InferenceService, ModelSource
from tensorfleet.engines import trtllm
from tensorfleet.engines.fingerprint import ENGINE_LABEL, FINGERPRINT_ANNOTATION, engine_manifest, engine_spec
from tensorfleet.engines.storeref import StoreRef, resolve
from tensorfleet.render import context as c
from tensorfleet.render import labels
from tensorfleet.render.workload import render_deployment
from tensorfleet.status import Condition

FETCH_CONTAINER = "engine-fetch"
MODEL_FETCH_CONTAINER = "model-fetch"
MODEL_FETCH_ROOT = f"{c.MODEL_CACHE_DIR}/tensorfleet"
_INIT_SECURITY = {"runAsNonRoot": True, "runAsUser": 65532, "allowPrivilegeEscalation": False,
                  "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
_INIT_RESOURCES = {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}


@dataclasses.dataclass(frozen=True)
class EngineView:
    """One eligible GPU product of a service and the state of its Engine."""

    product: str
    name: str | None  # None while the product's compute capability is unknown
    ready: bool
    reason: str
    message: str
    servable: bool = False  # a verified artifact is recorded (also while it is re-verified after a report)

    def status_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"gpuProduct": self.product, "ready": self.ready, "reason": self.reason}
        if self.name:
            entry["engine"] = self.name
        if not self.ready:
            entry["message"] = self.message[:1024]
        return entry


def service_errors(body: Mapping[str, Any]) -> list[FieldError]:
    """Engine settings of a (schema-valid) service that no build could use, named by the service's field."""
    options = ((body.get("spec") or {}).get("engine") or {}).get("buildOptions") or {}
    return trtllm.build_option_errors(options, path="spec.engine.buildOptions")


def default_store(ctx: c.RenderContext) -> StoreRef | None:
    return StoreRef.parse_default(ctx.engine_store, ctx.engine_store_endpoint, ctx.engine_store_region,
                                  ctx.engine_store_secret)


def _condition(body: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any]:
    for cond in ((body or {}).get("status") or {}).get("conditions") or ():
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def has_artifact(body: Mapping[str, Any] | None) -> bool:
    return bool((((body or {}).get("status") or {}).get("artifact") or {}).get("sha256"))


def is_ready(body: Mapping[str, Any] | None) -> bool:
    return _condition(body, "Ready").get("status") == "True" and has_artifact(body)


def desired_engines(isvc: InferenceService, products: Sequence[str],
                    capabilities: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """product -> the Engine manifest it needs (products of unknown compute capability are left out)."""
    wanted = {}
    for product in products:
        capability = capabilities.get(product)
        if capability:
            wanted[product] = engine_manifest(engine_spec(isvc, product, capability), isvc.namespace)
    return wanted


def engine_views(products: Sequence[str], wanted: Mapping[str, Mapping[str, Any]],
                 observed: Mapping[str, Mapping[str, Any]]) -> list[EngineView]:
    views = []
    for product in products:
        manifest = wanted.get(product)
        if manifest is None:
            views.append(EngineView(product, None, False, "WaitingForDiscovery",
                                    f"no node labelled nvidia.com/gpu.product={product} reports its compute "
                                    "capability (nvidia.com/gpu.compute.major/minor); the engine cannot be keyed"))
            continue
        name = manifest["metadata"]["name"]
        body = observed.get(name)
        if body is None:
            views.append(EngineView(product, name, False, "Creating", f"Engine {name} is being created"))
        elif is_ready(body):
            views.append(EngineView(product, name, True, "Ready", "engine ready", servable=True))
        else:
            ready = _condition(body, "Ready")
            failed = _condition(body, "Failed")
            reason = "BuildFailed" if failed.get("status") == "True" else str(ready.get("reason") or "Pending")
            message = str(failed.get("message") if failed.get("status") == "True" else ready.get("message") or "")
            views.append(EngineView(product, name, False, reason, f"Engine {name}: {message}",
                                    servable=has_artifact(body)))
    return views


def engine_ready_condition(views: Sequence[EngineView]) -> Condition:
    if not views:
        return Condition("EngineReady", "False", "NoGPUProducts", "no GPU product is eligible")
    waiting = [v for v in views if not v.ready]
    if not waiting:
        return Condition("EngineReady", "True", "AllEnginesReady",
                         ", ".join(f"{v.product}: {v.name}" for v in views))
    reason = "BuildFailed" if any(v.reason == "BuildFailed" for v in waiting) else "EnginesNotReady"
    ready = [v.product for v in views if v.ready]
    serving = f"serving on {', '.join(ready)}; " if ready else ""
    return Condition("EngineReady", "False", reason, serving + "; ".join(f"{v.product}: {v.message}" for v in waiting))


def waiting_conditions(views: Sequence[EngineView]) -> list[Condition]:
    """Service conditions while no product has an Engine with a verified artifact (nothing can serve yet)."""
    failed = [v for v in views if v.reason == "BuildFailed"]
    message = "; ".join(f"{v.product}: {v.message}" for v in views)
    return [
        Condition("Ready", "False", "EngineNotReady", f"no GPU product has a ready engine yet: {message}"),
        Condition("Progressing", "True" if len(failed) < len(views) else "False",
                  "BuildingEngines" if len(failed) < len(views) else "EngineBuildFailed", message),
        Condition("Degraded", "True" if failed else "False", "EngineBuildFailed" if failed else "AsExpected",
                  "; ".join(f"{v.product}: {v.message}" for v in failed) or "no problems found"),
    ]


# ---- Engine ownership: create or reuse, release when no longer needed -----------------------------------


@dataclasses.dataclass(frozen=True)
class EngineWrite:
    """``create`` (body), ``patch`` (ownerReferences, guarded by resourceVersion) or ``delete``."""

    action: str
    name: str
    namespace: str
    body: Mapping[str, Any] | None = None


def _ours(body: Mapping[str, Any]) -> bool:
    return (body.get("metadata", {}).get("labels") or {}).get(labels.MANAGED_BY) == labels.MANAGER


def engine_writes(isvc: InferenceService, wanted: Sequence[Mapping[str, Any]],
                  observed: Mapping[str, Mapping[str, Any]], keep: frozenset[str] = frozenset()) -> list[EngineWrite]:
    """Create missing Engines owned by the service; add the service as an owner of Engines it now
    shares; drop it from those it no longer needs (deleting them when it was the last owner), except
    ``keep``: Engines that Deployments of the service still serve until what takes over can (see ``Swap``).
    Engines a user applied (without tensorfleet's managed-by label) are used, never owned or deleted."""
    ref = {**labels.owner_reference(isvc.name, isvc.uid), "controller": False}
    writes = []
    wanted_names = set()
    for manifest in wanted:
        name = manifest["metadata"]["name"]
        wanted_names.add(name)
        body = observed.get(name)
        if body is None:
            created = copy.deepcopy(dict(manifest))
            created["metadata"]["labels"] = {labels.MANAGED_BY: labels.MANAGER}
            created["metadata"]["ownerReferences"] = [ref]
            writes.append(EngineWrite("create", name, isvc.namespace, created))
            continue
        refs = list(body.get("metadata", {}).get("ownerReferences") or [])
        if _ours(body) and not any(r.get("uid") == isvc.uid for r in refs):
            writes.append(EngineWrite("patch", name, isvc.namespace, _owner_patch(body, [*refs, ref])))
    for name, body in observed.items():
        refs = list(body.get("metadata", {}).get("ownerReferences") or [])
        if name in wanted_names or name in keep or not _ours(body) or not any(r.get("uid") == isvc.uid for r in refs):
            continue
        rest = [r for r in refs if r.get("uid") != isvc.uid]
        writes.append(EngineWrite("patch", name, isvc.namespace, _owner_patch(body, rest)) if rest
                      else EngineWrite("delete", name, isvc.namespace))
    return writes


def _owner_patch(body: Mapping[str, Any], refs: list[Mapping[str, Any]]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"metadata": {"ownerReferences": refs, "resourceVersion": meta.get("resourceVersion")}}


# ---- pod templates: fetch and verify before the engine starts ----------------------------------------------


def with_engine_fetch(deployment: dict[str, Any], engine: Mapping[str, Any], ctx: c.RenderContext,
                      max_batch_size: int) -> dict[str, Any]:
    """The serving Deployment of one product, with the init container that fetches and verifies its engine."""
    store = resolve(engine["spec"], default_store(ctx))
    status = engine.get("status") or {}
    fingerprint = str(status.get("fingerprint") or engine["metadata"].get("annotations", {}).get(
        FINGERPRINT_ANNOTATION, ""))
    out = copy.deepcopy(deployment)
    template = out["spec"]["template"]
    template["metadata"]["labels"][ENGINE_LABEL] = engine["metadata"]["name"]
    pod = template["spec"]
    init = {
        "name": FETCH_CONTAINER,
        "image": ctx.gateway_image,
        "imagePullPolicy": ctx.image_pull_policy,
        "args": ["engine", "fetch", "--fingerprint", fingerprint, "--sha256", str(status["artifact"]["sha256"]),
                 *(store.args() if store else []), "--dest", c.ENGINE_DIR, "--max-batch-size", str(max_batch_size),
                 "--timeout", str(ctx.engine_fetch_timeout_seconds)],
        "env": store.env() if store else [],
        "resources": _INIT_RESOURCES,
        "securityContext": _INIT_SECURITY,
        "volumeMounts": [{"name": "engines", "mountPath": c.ENGINE_DIR},
                         *(store.mounts(read_only=True) if store else [])],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod["initContainers"] = [*pod.get("initContainers", []), init]
    if store:
        pod["volumes"] = [*pod["volumes"], *store.volumes(read_only=True)]
    pod["securityContext"] = {**pod.get("securityContext", {}), "fsGroup": 65532}
    return out


def with_model_fetch(deployment: dict[str, Any], isvc: InferenceService, ctx: c.RenderContext) -> dict[str, Any]:
    """vLLM without an engine: download the weights into the cache volume and verify ``spec.model.digest``
    in an init container (timeout, retries), then serve from the verified local copy."""
    digest = isvc.spec.model.digest
    if not digest:
        return deployment
    source = ModelSource.parse(isvc.spec.model.uri)
    out = copy.deepcopy(deployment)
    pod = out["spec"]["template"]["spec"]
    engine = next(ct for ct in pod["containers"] if ct["name"] == "engine")
    local = f"{MODEL_FETCH_ROOT}/{digest.removeprefix('sha256:')}"
    mounts: list[dict[str, Any]] = [{"name": "model-cache", "mountPath": c.MODEL_CACHE_DIR}]
    if source.scheme == "pvc":
        local = f"{c.PVC_MODEL_DIR}/{source.path}".rstrip("/")
        mounts.append({"name": "model", "mountPath": c.PVC_MODEL_DIR, "readOnly": True})
    env = [e for e in engine.get("env", []) if e["name"] in ("HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    pod["initContainers"] = [*pod.get("initContainers", []), {
        "name": MODEL_FETCH_CONTAINER,
        "image": ctx.gateway_image,
        "imagePullPolicy": ctx.image_pull_policy,
        "args": ["model", "fetch", "--uri", isvc.spec.model.uri, "--digest", digest, "--dest", local,
                 "--timeout", str(ctx.model_fetch_timeout_seconds)],
        "env": [{"name": "HF_HOME", "value": f"{c.MODEL_CACHE_DIR}/hf"}, *env],
        "resources": _INIT_RESOURCES,
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }]
    args = engine["args"]
    model_at = 2  # vllm serve MODEL ...
    rest = args[model_at + 1:]
    for flag in ("--revision", "--load-format"):
        if flag in rest:
            index = rest.index(flag)
            rest = rest[:index] + rest[index + 2:]
    engine["args"] = [*args[:model_at], local, *rest]
    return out


# ---- the InferenceService hook ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Swap:
    """An observed Deployment of the service left exactly as it runs, serving what it serves, until what takes
    over from it (``successor``) can serve: its product's new Engine (an engine change, ``engine_swap``), or the
    Deployments of the service's new runtime (``runtime_switch``). ``reason``: the Progressing reason while that
    is under way (BuildingEngines, RollingOut), None when nothing is; ``failure``: the Degraded reason when it
    cannot come (EngineBuildFailed, NoGPUProducts), None otherwise; ``detail``: where it stands."""

    deployment: Mapping[str, Any]
    successor: str
    detail: str
    reason: str | None
    failure: str | None = None

    @property
    def serving_engine(self) -> str:
        return fetched_engine(self.deployment) or ""

    def message(self) -> str:
        meta = self.deployment["metadata"]
        product = product_of(self.deployment)
        engine = self.serving_engine
        serves = f"Engine {engine}" if engine else f"with runtime {runtime_of(self.deployment)}"
        detail = f" ({self.detail})" if self.detail else ""
        return (f"{f'{product}: ' if product else ''}Deployment {meta['name']} keeps serving {serves} until "
                f"{self.successor} can serve{detail}")


def engine_swap(deployment: Mapping[str, Any], view: EngineView) -> Swap:
    """``deployment`` serves another Engine than its product's wanted one (``view``), which cannot serve yet."""
    failed = view.reason == "BuildFailed"
    return Swap(deployment, f"Engine {view.name}" if view.name else "its new Engine", view.message,
                None if failed else "BuildingEngines", "EngineBuildFailed" if failed else None)


def product_of(deployment: Mapping[str, Any]) -> str | None:
    """The GPU product a serving Deployment is pinned to (its label), None for none."""
    return ((deployment.get("metadata") or {}).get("labels") or {}).get(labels.GPU_PRODUCT_LABEL)


def products_served(deployments: Sequence[Mapping[str, Any]]) -> frozenset[str]:
    """The GPU products serving Deployments run on: a triton one's product label, a vLLM one's required
    product affinity (``nvidia.com/gpu.product In [...]``)."""
    served = {p for p in map(product_of, deployments) if p}
    for deployment in deployments:
        pod = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
        required = (((pod.get("affinity") or {}).get("nodeAffinity") or {})
                    .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
        for term in required.get("nodeSelectorTerms") or ():
            served.update(value for expression in (term or {}).get("matchExpressions") or ()
                          if expression.get("key") == labels.NODE_GPU_PRODUCT and expression.get("operator") == "In"
                          for value in expression.get("values") or ())
    return frozenset(served)


def runtime_of(deployment: Mapping[str, Any]) -> str:
    """The runtime a serving Deployment of tensorfleet runs: triton's are pinned to one GPU product."""
    return "triton" if product_of(deployment) is not None else "vllm"


def runtime_switch(isvc: InferenceService, running: Sequence[Mapping[str, Any]], rendered: Sequence[Mapping[str, Any]],
                   views: Sequence[EngineView], taken_over: bool) -> list[Swap]:
    """A Swap for each ``running`` Deployment of the runtime the service left (vllm <-> triton): it keeps
    serving until the new runtime's Deployments completed their rollouts (``taken_over``). While none is
    rendered yet (triton: no Engine can serve), it waits on the Engines (``views``). None with 0 replicas asked,
    and none for a Deployment that runs none or has none available (a switch back before it ever served)."""
    runtime = isvc.spec.runtime.name
    old = [d for d in running if runtime_of(d) != runtime and (d.get("spec") or {}).get("replicas")
           and (d.get("status") or {}).get("availableReplicas")]  # one that never served has nothing to hand over
    if taken_over or not old or not isvc.spec.desired_replicas:
        return []
    successor = f"runtime {runtime}"
    if rendered:
        return [Swap(d, successor, "", "RollingOut") for d in old]
    failed = [v for v in views if v.reason == "BuildFailed"]
    detail = "; ".join(f"{v.product}: {v.message}" for v in views) or "no GPU product is eligible"
    reason = "BuildingEngines" if len(failed) < len(views) else None
    failure = "EngineBuildFailed" if failed else None
    if not views:
        failure = "NoGPUProducts"
    return [Swap(d, successor, detail, reason, failure) for d in old]


@dataclasses.dataclass(frozen=True)
class TritonPlan:
    deployments: tuple[dict[str, Any], ...]
    views: tuple[EngineView, ...]
    writes: tuple[EngineWrite, ...]
    swaps: tuple[Swap, ...] = ()  # observed Deployments left as they are: their product's new Engine cannot serve yet


def fetched_engine(deployment: Mapping[str, Any]) -> str | None:
    """The Engine a serving Deployment's pods fetch (its pod template's engine label), None for none."""
    template = (deployment.get("spec") or {}).get("template") or {}
    return ((template.get("metadata") or {}).get("labels") or {}).get(ENGINE_LABEL)


def pending_swaps(views: Sequence[EngineView], running: Sequence[Mapping[str, Any]]) -> dict[str, Swap]:
    """product -> Swap, for each product whose wanted Engine cannot serve yet while a Deployment of the
    service serves it from another Engine: keep serving what runs until the new engine can take over."""
    by_product = {product_of(d): d for d in running if fetched_engine(d)}
    return {v.product: engine_swap(by_product[v.product], v) for v in views
            if not v.servable and v.product in by_product}


def plan_triton(isvc: InferenceService, ctx: c.RenderContext, products: tuple[str, ...],
                capabilities: Mapping[str, str], engines: Sequence[Mapping[str, Any]],
                running: Sequence[Mapping[str, Any]],
                split_replicas: Callable[[int, tuple[str, ...]], dict[str, int]]) -> TritonPlan:
    """One Deployment per eligible product whose Engine can serve, replicas spread over the products that
    serve: those and the ones whose ``running`` Deployment keeps serving an older Engine meanwhile (a swap).
    A swapping product with no replicas requested is not kept. Engines a kept Deployment fetches stay owned."""

    observed = {e["metadata"]["name"]: e for e in engines}
    wanted = desired_engines(isvc, products, capabilities)
    views = engine_views(products, wanted, observed)
    swaps = pending_swaps(views, running)
    ready = {v.product for v in views if v.servable}
    counts = split_replicas(isvc.spec.desired_replicas, tuple(v.product for v in views
                                                                if v.product in ready or v.product in swaps))
    swaps = {product: swap for product, swap in swaps.items() if counts[product]}
    assert isvc.spec.engine is not None
    deployments = []
    for product, count in counts.items():
        if product in ready:
            name = wanted[product]["metadata"]["name"]
            base = render_deployment(isvc, ctx, count, variant=labels.product_slug(product), gpu_product=product)
            deployments.append(with_engine_fetch(base, observed[name], ctx, isvc.spec.engine.max_batch_size))
    in_use = frozenset(swap.serving_engine for swap in swaps.values())
    writes = engine_writes(isvc, list(wanted.values()), observed, keep=in_use)
    return TritonPlan(tuple(deployments), tuple(views), tuple(writes), tuple(swaps.values()))


def swap_conditions(conditions: Sequence[Condition], swaps: Sequence[Swap]) -> list[Condition]:
    """The service's conditions while Deployments keep serving (see ``Swap``): Progressing=True while what takes
    over builds (BuildingEngines) or rolls out (RollingOut); once it cannot come, Degraded=True (EngineBuildFailed,
    NoGPUProducts) and, with nothing else in progress, Progressing=False. Ready and an ApplyFailed, NameConflict
    or RolloutFailed stay as they are."""
    by_type = {cond.type: cond for cond in conditions}
    failed = [s for s in swaps if s.failure]
    moving = [s for s in swaps if s.reason]
    progressing, degraded = by_type["Progressing"], by_type["Degraded"]
    rolling = [progressing.message] if progressing.status == "True" else []
    if moving:
        reason = "BuildingEngines" if any(s.reason == "BuildingEngines" for s in moving) else "RollingOut"
        by_type["Progressing"] = Condition("Progressing", "True", reason,
                                           "; ".join([*(s.message() for s in moving), *rolling]))
    elif failed and not rolling:
        by_type["Progressing"] = Condition("Progressing", "False", str(failed[0].failure),
                                           "; ".join(s.message() for s in failed))
    if failed and degraded.status != "True":
        by_type["Degraded"] = Condition("Degraded", "True", str(failed[0].failure),
                                        "; ".join(s.message() for s in failed))
    return list(by_type.values())
