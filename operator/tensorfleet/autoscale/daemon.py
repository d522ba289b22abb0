"""kopf wiring of the autoscaler: a pods index and one daemon per InferenceService in ``mode: tensorfleet``.

Every ``autoscale_interval_seconds`` the daemon scrapes the ready pods' gateways, folds what they
report into an ``Observation``, asks ``policy.decide`` and, when replicas should change, writes them
through the InferenceService's scale subresource (``/scale``), never the Deployments: the reconcile
daemon then rolls the Deployments from ``spec.replicas``. Each change is recorded in
``status.autoscaling`` and posted as an Event; a steady service causes no writes.

One owner of replicas: in ``hpa`` and ``keda`` modes this daemon does not run at all (kopf stops it
when the mode changes), and in ``tensorfleet`` mode it refuses to act while any HorizontalPodAutoscaler
targets the service or its Deployments, reporting ``ConflictingAutoscaler`` instead of fighting it.

Only the leader acts: with peering, kopf pauses an operator that sees a peer of higher priority and
stops all its daemons; the daemon checks ``stopped`` again after scraping, so a pause that arrives
during a scrape acts on nothing.
"""

from __future__ import annotations

import copy
import datetime
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kopf

from tensorfleet import API_GROUP, API_VERSION, handlers, kube
from tensorfleet.api.types import InferenceService
from tensorfleet.api.validation import validate_body
from tensorfleet.autoscale import policy, signals
from tensorfleet.autoscale import status as records
from tensorfleet.autoscale.scraper import Scraper
from tensorfleet.autoscale.signals import PodTarget
from tensorfleet.render import labels

logger = logging.getLogger(__name__)
ISVC = f"{API_GROUP}/{API_VERSION}"
HPA = "autoscaling/v2"
POD_LABELS = {labels.MANAGED_BY: labels.MANAGER, "app.kubernetes.io/component": "inference"}
BLOCKING = frozenset({"ConflictingAutoscaler", "NoMetrics"})


class OptionalKedaFilter(logging.Filter):
    """KEDA is optional (only ``mode: keda`` needs it), so its absence is not kopf's startup warning but a note.

    kopf warns about every resource a handler names that the cluster does not serve; the operator
    indexes KEDA ScaledObjects (to prune them when a service leaves mode keda) on every cluster.
    """

    NOTE = "KEDA's ScaledObject API is not served in this cluster: autoscaling.mode keda cannot be used"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Unresolved resources cannot be served"):
            return True
        unresolved = message.split(":", 1)[1].strip()
        if unresolved.count("Selector(") == 1 and "group='keda.sh'" in unresolved:
            logger.info(self.NOTE)
            return False
        return True


logging.getLogger("kopf._core.reactor.observation").addFilter(OptionalKedaFilter())


@handlers.declare(kopf.index, "", "v1", "pods", labels=POD_LABELS)
async def pods_idx(body: kopf.Body, **_: Any) -> Any:
    """Serving pods by (namespace, service), reduced to what the autoscaler needs: phase and metrics URL."""
    owner = (body.metadata.labels or {}).get(labels.ISVC_LABEL)
    if not owner or not body.metadata.namespace:
        return None
    return {(body.metadata.namespace, owner): signals.pod_target(body)}


def autoscaled_by_tensorfleet(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("autoscaling") or {}).get("mode") == "tensorfleet")


@handlers.declare(kopf.daemon, API_GROUP, API_VERSION, "inferenceservices", id="autoscaler",
                  when=autoscaled_by_tensorfleet, cancellation_backoff=1.0, cancellation_timeout=10.0)
async def autoscaler_daemon(stopped: Any, body: kopf.Body, namespace: str | None, name: str, memo: Any,
                            **kwargs: Any) -> None:
    runtime = memo.runtime
    pods: kopf.Index[tuple[str, str], PodTarget] = kwargs["pods_idx"]
    namespace = namespace or ""
    if getattr(memo, "autoscale_scraper", None) is None:
        memo.autoscale_scraper = Scraper(runtime.settings.autoscale_scrape_timeout_seconds)
    autoscaler = ServiceAutoscaler(runtime.client, memo.autoscale_scraper, namespace, name)
    interval = runtime.settings.autoscale_interval_seconds
    logger.info("autoscaling %s/%s every %.1f s", namespace, name, interval)
    with runtime.triggers.until_deleted(stopped, str(body.metadata.uid)) as stop:
        while not stop:
            await stop.wait(interval)
            if stop:
                break
            try:
                await autoscaler.tick(body, list(pods.get((namespace, name), ())), lambda: bool(stop))
            except kube.Vanished as exc:  # its DELETED event was lost: end with the service's other daemons
                logger.info("%s: no more autoscaling for it", exc)
                runtime.triggers.deleted(str(body.metadata.uid))
            except kube.APIError as exc:
                logger.warning("autoscaling %s/%s: %s", namespace, name, exc)
            except Exception:  # one service's trouble must not end its autoscaling for good
                logger.exception("autoscaling %s/%s crashed; retrying", namespace, name)


@handlers.declare(kopf.on.cleanup)
async def close_scraper(memo: Any, **_: Any) -> None:
    scraper = getattr(memo, "autoscale_scraper", None)
    if scraper is not None:
        await scraper.aclose()


class ServiceAutoscaler:
    """The decision loop of one service: its history lives here, in memory (a new leader starts afresh)."""

    def __init__(self, client: kube.KubeClient, scraper: Scraper, namespace: str, name: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.scraper = scraper
        self.namespace = namespace
        self.name = name
        self.clock = clock
        self.history = policy.History()
        self._checked: tuple[int, bool] | None = None  # (generation, spec valid): CEL validation costs ~10 ms
        self._written_at: int | None = None  # the generation our last /scale write replaced

    async def tick(self, live: Mapping[str, Any], targets: Sequence[PodTarget], stopped: Callable[[], bool]) -> None:
        body = copy.deepcopy(dict(live))  # kopf's live body changes under us; decide on one snapshot
        generation = int(body.get("metadata", {}).get("generation") or 0)
        if self._checked is None or self._checked[0] != generation:
            self._checked = (generation, not validate_body(body))
        if not self._checked[1]:
            return  # an invalid spec is reported by reconcile; nothing to scale by
        if self._written_at is not None and generation <= self._written_at:
            return  # our last write has not come back through the watch yet: do not decide on stale replicas
        isvc = InferenceService.from_body(body)
        config = policy.PolicyConfig.from_spec(isvc.spec.autoscaling)
        metrics = await self.scraper.scrape(targets)
        observation = signals.observe(self.clock(), isvc.spec.scale_replicas, targets, metrics)
        decision = policy.decide(config, self.history, observation)
        self.history = decision.history
        if stopped():
            return  # paused (no longer the leader) or stopping while we scraped: act on nothing
        current = (body.get("status") or {}).get("autoscaling")
        stored_reason = (current or {}).get("reason")
        client = self.client.acting_for(body)  # writes only while the service exists (its uid)
        if decision.changed or stored_reason == "ConflictingAutoscaler":
            conflict = await self._conflicting_autoscaler(isvc)
            if conflict:
                await self._record(client, body, records.blocked_status(current, "ConflictingAutoscaler", conflict))
                return
        if decision.changed:
            await client.patch(ISVC, "InferenceService", self.namespace, self.name,
                               {"spec": {"replicas": decision.replicas}}, subresource="scale")
            self._written_at = generation
            logger.info("scaled %s/%s: %s", self.namespace, self.name, decision.message)
            await self._record(client, body, records.decision_status(decision, current, _now()))
        elif decision.reason in BLOCKING or stored_reason in BLOCKING:
            await self._record(client, body, records.blocked_status(current, decision.reason, decision.message))

    async def _record(self, client: kube.KubeClient, body: Mapping[str, Any], wanted: dict[str, Any]) -> None:
        """Write status.autoscaling and post an Event, when what is stored differs (never on a steady tick)."""
        current = (body.get("status") or {}).get("autoscaling")
        if current == wanted:
            return
        await client.patch(ISVC, "InferenceService", self.namespace, self.name,
                           {"status": {"autoscaling": records.merge_patch(current, wanted)}}, subresource="status")
        if (current or {}).get("reason") != wanted.get("reason") or wanted.get("lastScaleTime") != (
                current or {}).get("lastScaleTime"):
            event = records.decision_event(str(wanted.get("reason")), str(wanted.get("message")))
            await client.post_event(body, event.type, event.reason, event.message, _now())

    async def _conflicting_autoscaler(self, isvc: InferenceService) -> str | None:
        """Why another autoscaler owns these replicas (an HPA targets the service or its Deployments), or None."""
        hpas = await self.client.list(HPA, "HorizontalPodAutoscaler", self.namespace)
        ours: set[str] | None = None
        for hpa in hpas:
            ref = (hpa.get("spec") or {}).get("scaleTargetRef") or {}
            hit = ref.get("kind") == "InferenceService" and ref.get("name") == isvc.name
            if ref.get("kind") == "Deployment" and not hit:
                if ours is None:
                    found = await self.client.list("apps/v1", "Deployment", self.namespace,
                                                   labels.selector_string(isvc.name))
                    ours = {d["metadata"]["name"] for d in found}
                hit = ref.get("name") in ours
            if hit:
                owner = hpa["metadata"]["name"]
                return (f"HorizontalPodAutoscaler {owner} scales {ref.get('kind')} {ref.get('name')}: remove it or "
                        "set spec.autoscaling.mode to hpa; tensorfleet will not fight it over replicas")
        return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
