"""The one reconcile: an InferenceService and what exists in the cluster in, desired objects and status out.

Pure and idempotent. The controller runs it on create, update, resume, child changes and a timer,
and writes only the difference. Nothing here talks to the API server or reads the clock.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from tensorfleet import diff
from tensorfleet.api.resources import request_limit_errors
from tensorfleet.api.schema import FieldError, InvalidSpecError
from tensorfleet.api.types import InferenceService
from tensorfleet.api.validation import advisories, validate_body
from tensorfleet.autoscale import status as autoscale_status
from tensorfleet.autoscale.render import autoscaler_objects, mode_errors
from tensorfleet.engines import discovery, serving
from tensorfleet.render import labels
from tensorfleet.render.context import RenderContext
from tensorfleet.render.gateway import render_config_map, render_revision_config_map
from tensorfleet.render.workload import render_deployment, render_pdb, render_service, service_url
from tensorfleet.status import Condition, Event, condition, merge_conditions, transitions

MAX_LISTED_ERRORS = 10
# status keys reconcile writes (status.autoscaling has its own merge patch: tensorfleet's autoscaler owns it
# in mode tensorfleet); one that a valid spec's plan leaves out is removed.
OWNED_STATUS_KEYS = ("replicas", "readyReplicas", "selector", "url", "gpu", "engines")


@dataclasses.dataclass(frozen=True)
class Observed:
    """What exists now: the children labelled as ours, the GPU products in the cluster, the last write failure,
    and the children whose name an object this service does not control already has ('Service llama').

    ``gpu_products`` is None when nothing is known about the cluster's GPUs (no discovery yet);
    ``cordoned_products``: those of them whose nodes are all cordoned, ``gpu_nodes`` their nodes (see
    ``present_products``).
    """

    children: tuple[Mapping[str, Any], ...] = ()
    apply_error: str | None = None
    conflicts: tuple[str, ...] = ()
    gpu_products: tuple[str, ...] | None = None
    cordoned_products: tuple[str, ...] = ()
    gpu_nodes: tuple[discovery.NodeGPUs, ...] | None = None  # None: no detail (only the product names)
    # GPU discovery and Engines (tensorfleet.engines). engines None: not observed (offline render).
    compute_capabilities: Mapping[str, str] = dataclasses.field(default_factory=dict)
    engines: tuple[Mapping[str, Any], ...] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    desired: tuple[dict[str, Any], ...]
    prune: tuple[Mapping[str, Any], ...]
    status: dict[str, Any]
    events: tuple[Event, ...]
    errors: tuple[FieldError, ...]
    engine_writes: tuple[serving.EngineWrite, ...] = ()


def child_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(obj.get("apiVersion")), str(obj.get("kind")), str(obj.get("metadata", {}).get("name")))


def eligible_products(isvc: InferenceService, present: tuple[str, ...] | None) -> tuple[str, ...]:
    """The allow-list in preference order, narrowed to the products present (all present when empty)."""
    allowed = isvc.spec.gpu.products
    if present is None:
        return allowed
    if not allowed:
        return present
    return tuple(p for p in allowed if p in present)


def present_products(isvc: InferenceService, observed: Observed,
                     deployments: Sequence[Mapping[str, Any]]) -> tuple[str, ...] | None:
    """The products the service may run on: those with a node that takes new pods and could hold one replica
    (``fitting_products``), and those where a Deployment of the service already runs. A cordon stops new pods,
    not running ones: a product that serves keeps its Deployment (and Engine) until its nodes are gone,
    evicted through the PDB."""
    if observed.gpu_products is None:
        return None
    served = serving.products_served(deployments)
    fitting = fitting_products(isvc, observed)
    return tuple(p for p in observed.gpu_products if p in served or p in fitting)


def fitting_products(isvc: InferenceService, observed: Observed) -> frozenset[str]:
    """The products with an uncordoned node that has ``spec.gpu.count`` allocatable whole GPUs and matches
    ``spec.nodeSelector`` (without node detail: every product not only on cordoned nodes)."""
    if observed.gpu_nodes is None:
        return frozenset(p for p in observed.gpu_products or () if p not in observed.cordoned_products)
    gpus, selector = isvc.spec.gpu.count, isvc.spec.node_selector
    return frozenset(n.product for n in observed.gpu_nodes if n.schedulable and n.fits(gpus, selector))


def split_replicas(total: int, products: tuple[str, ...]) -> dict[str, int]:
    """Spread replicas over products, the preferred ones first: 3 over (A, B) gives A 2 and B 1."""
    if not products:
        return {}
    base, extra = divmod(total, len(products))
    return {p: base + (1 if rank < extra else 0) for rank, p in enumerate(products)}


def desired_objects(isvc: InferenceService, ctx: RenderContext, gpu_products: tuple[str, ...] | None = None,
                    triton: serving.TritonPlan | None = None) -> list[dict[str, Any]]:
    """Every child the service should have, stamped with the hash of its rendered content.

    ``triton``: the engine-gated Deployments (see ``engines.serving.plan_triton``); without it (offline
    ``tensorfleet render``) every eligible product gets a Deployment, without the engine-fetch step."""
    replicas = isvc.spec.desired_replicas
    products = eligible_products(isvc, gpu_products)
    if isvc.spec.runtime.name == "vllm":
        deployments = [serving.with_model_fetch(render_deployment(isvc, ctx, replicas, products=products), isvc, ctx)]
    elif triton is not None:
        deployments = list(triton.deployments)
    else:
        deployments = [render_deployment(isvc, ctx, count, variant=labels.product_slug(product), gpu_product=product)
                       for product, count in split_replicas(replicas, products).items()]
    objects = [render_config_map(isvc, ctx), render_revision_config_map(isvc, ctx), *deployments,
               render_service(isvc), render_pdb(isvc), *autoscaler_objects(isvc, ctx)]
    return [diff.stamp(obj) for obj in objects]


def spec_errors(body: Mapping[str, Any], ctx: RenderContext) -> list[FieldError]:
    """Why a (schema-valid) service cannot be rendered here: cross-field rules, unusable engine options, and
    an autoscaling mode this installation does not allow. Empty when it can."""
    return (validate_body(body) or request_limit_errors(body) or serving.service_errors(body)
            or mode_errors(body, ctx))


def reconcile(body: Mapping[str, Any], observed: Observed, ctx: RenderContext, now: datetime.datetime) -> Plan:
    meta = body.get("metadata", {})
    generation = int(meta.get("generation") or 0)
    previous = (body.get("status") or {}).get("conditions") or []
    errors = spec_errors(body, ctx)
    owned = [c for c in observed.children if owned_by(c, meta.get("uid"))]
    plan: Plan | None = None
    if not errors:
        try:
            plan = _converge(body, InferenceService.from_body(body), observed, owned, ctx)
        except InvalidSpecError as exc:  # a shape the checks let through: reported like theirs
            errors = list(exc.errors)
    if plan is None:
        deployments = [c for c in owned if c.get("kind") == "Deployment"]
        plan = Plan((), (), _status(body, deployments, _invalid_conditions(errors, deployments), None, ctx), (),
                    tuple(errors))  # keep serving what runs until the spec is fixed: nothing written, nothing pruned
    status = plan.status
    status["observedGeneration"] = generation
    status["conditions"] = merge_conditions(previous, status.pop("_conditions"), generation, now)
    events = transitions(previous, status["conditions"]) + _new_warnings(body, status)
    return dataclasses.replace(plan, events=tuple(events))


def _warnings(isvc: InferenceService, body: Mapping[str, Any]) -> dict[str, Any]:
    """``status.warnings``: the spec's advisories (removed by a merge patch once there are none)."""
    notes = [{"field": note.path, "message": note.message} for note in advisories(isvc.spec)]
    if notes or "warnings" in (body.get("status") or {}):
        return {"warnings": notes or None}
    return {}


def _new_warnings(body: Mapping[str, Any], status: Mapping[str, Any]) -> list[Event]:
    """A Warning event for each advisory the stored status does not have yet (once, not on every pass)."""
    before = (body.get("status") or {}).get("warnings") or []
    return [Event("Warning", "SpecWarning", f"{note['field']}: {note['message']}")
            for note in status.get("warnings") or [] if note not in before]


def _converge(body: Mapping[str, Any], isvc: InferenceService, observed: Observed, owned: list[Mapping[str, Any]],
              ctx: RenderContext) -> Plan:
    """The plan of a valid spec. Observed Deployments that keep serving until what takes over from them can
    serve (``serving.Swap``: a product's new Engine, or the new runtime after a runtime switch) are kept as they
    are, with the Engines they fetch; the Engines of a service that no longer runs triton are released."""
    deployments = [c for c in owned if c.get("kind") == "Deployment"]
    present = present_products(isvc, observed, deployments)
    triton = _triton_plan(isvc, observed, present, deployments, ctx)
    desired = desired_objects(isvc, ctx, present, triton)
    rendered = [d for d in desired if d["kind"] == "Deployment"]
    replicated = [d for d in rendered if _spec_replicas(d)]  # one asked for 0 is complete at once, serving nothing
    switch = serving.runtime_switch(isvc, deployments, rendered, triton.views if triton else (),
                                    bool(replicated) and _rolled_out(replicated, deployments))
    swaps = [*(triton.swaps if triton else ()), *switch]
    kept = [swap.deployment for swap in swaps]
    conditions = _serving_conditions([*rendered, *kept], deployments, observed, kept if switch else (),
                                     _serving_floor(body))
    if not rendered and not kept:
        conditions = _waiting_conditions(isvc, observed, present, triton, conditions)
    status = _status(body, deployments, conditions, isvc, ctx)
    status["_conditions"] = serving.swap_conditions(conditions, swaps)
    if triton is None:
        engines = {e["metadata"]["name"]: e for e in observed.engines or ()}
        in_use = frozenset(swap.serving_engine for swap in switch)
        writes = tuple(serving.engine_writes(isvc, [], engines, keep=in_use))  # release those no Deployment serves
    else:
        status["_conditions"].append(serving.engine_ready_condition(triton.views))
        status["engines"] = [v.status_entry() for v in triton.views]
        writes = triton.writes
    _remove_vanished(body, status)
    wanted = {child_key(obj) for obj in [*desired, *kept]}
    rolling = not _rolled_out(rendered, deployments)
    prune = tuple(c for c in owned if child_key(c) not in wanted and not _revision_in_use(c, rolling, deployments))
    return Plan(tuple(desired), prune, status, (), (), writes)


def _rolled_out(rendered: Sequence[Mapping[str, Any]], observed: Sequence[Mapping[str, Any]]) -> bool:
    """Whether every rendered Deployment completed its rollout (as ``observed`` shows it). Over those that run
    replicas, it says the new runtime serves all the replicas asked for, so what it replaces may go (one
    product's Deployment carries only its share)."""
    by_name = {d["metadata"]["name"]: d for d in observed}
    return all(_rollout(want, by_name.get(want["metadata"]["name"])).state == "complete" for want in rendered)


def _waiting_conditions(isvc: InferenceService, observed: Observed, present: tuple[str, ...] | None,
                        triton: serving.TritonPlan | None, serving_conditions: list[Condition]) -> list[Condition]:
    """The conditions while nothing serves or is kept serving: no GPU product to run on, or Engines that cannot
    serve yet. A name conflict or a failed write (say, a refused Engine create) is Degraded's reason over them."""
    if triton is not None and triton.views:
        conditions = serving.waiting_conditions(triton.views)
    else:
        conditions = _no_products_conditions(isvc, observed, present)
    write_problem = next(c for c in serving_conditions if c.type == "Degraded")
    if write_problem.reason in ("NameConflict", "ApplyFailed"):
        conditions = [write_problem if c.type == "Degraded" else c for c in conditions]
    return conditions


def _triton_plan(isvc: InferenceService, observed: Observed, present: tuple[str, ...] | None,
                 deployments: Sequence[Mapping[str, Any]], ctx: RenderContext) -> serving.TritonPlan | None:
    if isvc.spec.runtime.name != "triton" or observed.engines is None:
        return None
    products = eligible_products(isvc, present)
    return serving.plan_triton(isvc, ctx, products, observed.compute_capabilities, observed.engines, deployments,
                               split_replicas)


def _remove_vanished(body: Mapping[str, Any], status: dict[str, Any]) -> None:
    """A key reconcile owns that the stored status has and this plan does not: remove it (a merge-patch null)."""
    stored = body.get("status") or {}
    for key in OWNED_STATUS_KEYS:
        if key in stored and key not in status:
            status[key] = None


def _revision_in_use(child: Mapping[str, Any], rolling: bool, observed: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``child`` is the gateway ConfigMap of an older pod revision that pods may still start with.

    It is kept while a Deployment's template (as observed) mounts it, and then while a rollout is ``rolling``:
    an old pod that restarts or is rescheduled during the rollout must find its own revision's engine facts.
    """
    meta = child.get("metadata") or {}
    if child.get("kind") != "ConfigMap" or \
            (meta.get("labels") or {}).get(labels.COMPONENT_LABEL) != labels.GATEWAY_REVISION_COMPONENT:
        return False
    return rolling or any(meta.get("name") in _projected_config_maps(d) for d in observed)


def _projected_config_maps(deployment: Mapping[str, Any]) -> set[str]:
    pod = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    return {str(source["configMap"].get("name")) for volume in pod.get("volumes") or ()
            for source in ((volume.get("projected") or {}).get("sources") or ()) if source.get("configMap")}


def owned_by(child: Mapping[str, Any], uid: str | None) -> bool:
    """Whether ``child`` has a controller ownerReference to the object with ``uid``: only such objects
    are ever written over or pruned; any other object with a child's name is left alone."""
    refs = child.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == uid and ref.get("controller") for ref in refs)


def _status(body: Mapping[str, Any], deployments: Sequence[Mapping[str, Any]], conditions: list[Condition],
            isvc: InferenceService | None, ctx: RenderContext) -> dict[str, Any]:
    name = body["metadata"].get("name", "")
    replicas = sum(int((d.get("status") or {}).get("replicas") or 0) for d in deployments)
    ready = sum(int((d.get("status") or {}).get("readyReplicas") or 0) for d in deployments)
    status: dict[str, Any] = {
        "replicas": replicas,
        "readyReplicas": ready,
        "selector": labels.selector_string(name),
        "_conditions": conditions,
    }
    if isvc is not None:
        status["url"] = service_url(isvc, ctx)
        products = ",".join(isvc.spec.gpu.products) or "any"
        status["gpu"] = f"{isvc.spec.gpu.count}x {products}"
        status.update(autoscale_status.reconcile_fields(isvc, body))
        status.update(_warnings(isvc, body))
    else:  # keep what an earlier valid spec reported
        for key in ("url", "gpu"):
            if key in (body.get("status") or {}):
                status[key] = body["status"][key]
    return status


def _invalid_conditions(errors: Sequence[FieldError], deployments: Sequence[Mapping[str, Any]]) -> list[Condition]:
    listed = "; ".join(str(e) for e in errors[:MAX_LISTED_ERRORS])
    more = f" (and {len(errors) - MAX_LISTED_ERRORS} more)" if len(errors) > MAX_LISTED_ERRORS else ""
    message = f"invalid spec, nothing was changed: {listed}{more}"
    ready = _ready_condition(deployments, sum(_spec_replicas(d) for d in deployments), "InvalidSpec")
    return [
        ready,
        Condition("Progressing", "False", "InvalidSpec", "waiting for a valid spec"),
        Condition("Degraded", "True", "InvalidSpec", message),
    ]


def _no_products_conditions(isvc: InferenceService, observed: Observed,
                            present: tuple[str, ...] | None) -> list[Condition]:
    allowed = ", ".join(isvc.spec.gpu.products) or "any"
    found = ", ".join(present) if present else "none"
    cordoned = [p for p in observed.cordoned_products if p not in (present or ())]
    small = [p for p in observed.gpu_products or () if p not in (present or ()) and p not in cordoned]
    left_out = []
    if cordoned:
        left_out.append(f"{', '.join(cordoned)} only on cordoned nodes")
    if small:
        left_out.append(f"no node of {', '.join(small)} has {isvc.spec.gpu.count} allocatable nvidia.com/gpu and "
                        "matches spec.nodeSelector")
    usable = f"{found} ({'; '.join(left_out)})" if left_out else found
    message = (f"no GPU product to run on: spec.gpu.products allows {allowed}, the cluster has {usable}; "
               "triton needs a product to build its engine for")
    return [
        Condition("Ready", "False", "NoGPUProducts", message),
        Condition("Progressing", "False", "NoGPUProducts", message),
        Condition("Degraded", "True", "NoGPUProducts", message),
    ]


def _serving_conditions(rendered: Sequence[Mapping[str, Any]], deployments: Sequence[Mapping[str, Any]],
                        observed: Observed, serving_now: Sequence[Mapping[str, Any]] = (),
                        floor: int | None = None) -> list[Condition]:
    """Ready, Progressing and Degraded from the rollouts of ``rendered``; Ready from ``serving_now`` instead
    where given (the Deployments kept serving during a runtime switch, until the new runtime's can).

    Like a Deployment's own conditions: Progressing is a rollout of a new spec (or a scale-up, while the
    service stays Ready), not replicas lost after a rollout completed; those are Degraded."""
    by_name = {d["metadata"]["name"]: d for d in deployments}
    counted = serving_now or rendered
    rollouts = [_rollout(want, by_name.get(want["metadata"]["name"])) for want in rendered]
    live = [by_name[w["metadata"]["name"]] for w in counted if w["metadata"]["name"] in by_name]
    ready = _ready_condition(live, sum(_spec_replicas(d) for d in counted), None, floor)
    pending, failures, short = ([r.message for r in rollouts if r.state == state]
                                for state in ("rolling", "failed", "short"))
    if pending:
        progressing = Condition("Progressing", "True", "RollingOut", "; ".join(pending))
    elif short and ready.status == "True":  # a scale-up: the replicas that served still serve
        progressing = Condition("Progressing", "True", "Scaling", ready.message)
    else:
        done = "every replica runs the current spec" if short else "all replicas are updated and ready"
        progressing = Condition("Progressing", "False", "RolloutComplete", done)
    if observed.conflicts:
        degraded = _name_conflict(observed.conflicts, observed.apply_error)
    elif observed.apply_error:
        degraded = Condition("Degraded", "True", "ApplyFailed", observed.apply_error)
    elif failures:
        degraded = Condition("Degraded", "True", "RolloutFailed", "; ".join(failures))
    elif short and ready.status != "True":
        degraded = Condition("Degraded", "True", "ReplicasUnavailable", "; ".join(short))
    else:
        degraded = Condition("Degraded", "False", "AsExpected", "no problems found")
    return [ready, progressing, degraded]


def _serving_floor(body: Mapping[str, Any]) -> int | None:
    """The replicas the service was Ready with, as its status recorded them; None when it was not Ready.
    A scale-up keeps it Ready while those still are (its new replicas start); losing one of them does not."""
    status = body.get("status") or {}
    if (condition(status, "Ready") or {}).get("status") != "True":
        return None
    return int(status.get("readyReplicas") or 0)


def _name_conflict(conflicts: Sequence[str], apply_error: str | None) -> Condition:
    message = ("objects this InferenceService does not control (no controller ownerReference to it) have the "
               f"names of its children: {', '.join(conflicts)}; tensorfleet leaves them alone: delete or rename "
               "them to let it create its own")
    return Condition("Degraded", "True", "NameConflict", f"{message}; {apply_error}" if apply_error else message)


def _ready_condition(deployments: Iterable[Mapping[str, Any]], desired: int, reason_if_not: str | None,
                     floor: int | None = None) -> Condition:
    """Ready when every replica asked for is, or (``floor``, after a scale-up) as many as were when it was."""
    ready = sum(int((d.get("status") or {}).get("readyReplicas") or 0) for d in deployments)
    if desired == 0:
        return Condition("Ready", "False", reason_if_not or "ScaledToZero", "no replicas are requested")
    if ready >= min(desired, max(1, floor or desired)):
        return Condition("Ready", "True", "Available", f"{ready}/{desired} replicas ready")
    return Condition("Ready", "False", reason_if_not or "ReplicasNotReady", f"{ready}/{desired} replicas ready")


def _spec_replicas(deployment: Mapping[str, Any]) -> int:
    return int((deployment.get("spec") or {}).get("replicas") or 0)


class Rollout(NamedTuple):
    """One Deployment's rollout. ``state``: complete; rolling (a new spec or revision, or the first start);
    failed (its progress deadline passed, or a replica could not be created); short: its current revision
    rolled out completely and nothing rolls, but fewer replicas are available than it asks for (pods lost
    since, or a scale-up starting new ones)."""

    state: str
    message: str


def _rollout(want: Mapping[str, Any], have: Mapping[str, Any] | None) -> Rollout:
    """The rollout of one Deployment, from its status as the controller reports it."""
    name = want["metadata"]["name"]
    if have is None:
        return Rollout("rolling", f"Deployment {name} is being created")
    status = have.get("status") or {}
    replicas = _spec_replicas(want)
    conditions = {c.get("type"): c for c in status.get("conditions") or ()}
    progress, failure = conditions.get("Progressing") or {}, conditions.get("ReplicaFailure") or {}
    if progress.get("reason") == "ProgressDeadlineExceeded":
        return Rollout("failed", f"Deployment {name}: {progress.get('message') or 'progress deadline exceeded'}")
    if failure.get("status") == "True":
        return Rollout("failed", f"Deployment {name}: {failure.get('message') or failure.get('reason')}")
    generation = int(have.get("metadata", {}).get("generation") or 0)
    seen = int(status.get("observedGeneration") or 0)
    updated = int(status.get("updatedReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    if seen < generation:
        return Rollout("rolling", f"Deployment {name}: waiting for the controller to observe generation {generation}")
    counts = f"{updated}/{replicas} updated, {available}/{replicas} available"
    if updated < replicas or int(status.get("replicas") or 0) > replicas:
        return Rollout("rolling", f"Deployment {name}: {counts}")
    if available >= replicas:
        return Rollout("complete", f"Deployment {name} complete")
    if progress.get("reason") != "NewReplicaSetAvailable":  # this revision never was available in full yet
        return Rollout("rolling", f"Deployment {name}: {counts}")
    why = (conditions.get("Available") or {}).get("message") or "replicas unavailable"
    return Rollout("short", f"Deployment {name}: {available}/{replicas} available: {why}")
