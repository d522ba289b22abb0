"""The build Job of an Engine (pure builder), and reading its outcome from the Pods' termination messages."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from tensorfleet.api.types import ModelSource
from tensorfleet.engines.fingerprint import ENGINE_LABEL, FINGERPRINT_ANNOTATION
from tensorfleet.engines.storeref import StoreRef
from tensorfleet.render import labels

CONTAINER = "ensure"
WORK_DIR = "/work"
MODEL_MOUNT = "/mnt/model"
TERMINATION_LOG = "/dev/termination-log"
MANAGED = labels.MANAGED_BY
COMPONENT = "app.kubernetes.io/component"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


@dataclasses.dataclass(frozen=True)
class JobSettings:
    """What the operator decides for every build Job."""

    builder_image_template: str = "ghcr.io/tensorfleet/engine-builder:{trtllm_version}"
    retries: int = 2  # pod-level retries of one Job (Job backoffLimit; Kubernetes backs off 10 s, 20 s, ...)
    ttl_seconds_after_finished: int = 86400  # safety net; the operator deletes finished Jobs itself
    work_size_limit: str = "500Gi"
    # cpu, memory and ephemeral-storage requests of the build pod (besides its GPUs): without them it would be
    # BestEffort (evicted first under memory pressure) and refused in a namespace with a ResourceQuota on requests
    requests: Mapping[str, str] = dataclasses.field(default_factory=lambda: {
        "cpu": "4", "memory": "32Gi", "ephemeral-storage": "100Gi"})
    namespace_pull_secrets: tuple[str, ...] = ()


def job_name(engine_name: str, attempt: int) -> str:
    return f"{engine_name}-{attempt}"


def builder_image(spec: Mapping[str, Any], settings: JobSettings) -> str:
    return str(spec.get("builderImage") or settings.builder_image_template.format(
        trtllm_version=spec["trtllmVersion"]))


def _model_volumes(spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    source = ModelSource.parse(spec["model"]["uri"])
    if source.scheme != "pvc":
        return [], []
    volume = {"name": "model", "persistentVolumeClaim": {"claimName": source.location, "readOnly": True}}
    return [volume], [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}]


def _model_env(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    secret = (spec["model"].get("credentialsSecretRef") or {}).get("name")
    if not secret:
        return []
    scheme = ModelSource.parse(spec["model"]["uri"]).scheme
    keys = ["HF_TOKEN"] if scheme == "hf" else ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] if scheme == "s3" else []
    return [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k, "optional": True}}} for k in keys]


def _container(engine: Mapping[str, Any], store: StoreRef, settings: JobSettings) -> dict[str, Any]:
    spec = engine["spec"]
    gpus = str(spec["tensorParallelSize"])
    _, model_mounts = _model_volumes(spec)
    return {
        "name": CONTAINER,
        "image": builder_image(spec, settings),
        "command": ["tensorfleet"],
        "args": ["engine", "ensure", "--spec", json.dumps(spec, sort_keys=True, separators=(",", ":")),
                 *store.args(), "--workdir", WORK_DIR, "--timeout", str(spec["buildTimeoutSeconds"]),
                 "--termination-log", TERMINATION_LOG],
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
                *_model_env(spec), *store.env()],
        "resources": {"requests": {**settings.requests, "nvidia.com/gpu": gpus}, "limits": {"nvidia.com/gpu": gpus}},
        "volumeMounts": [{"name": "work", "mountPath": WORK_DIR}, *store.mounts(read_only=False), *model_mounts],
        "terminationMessagePath": TERMINATION_LOG,
        # A crash before ensure writes its message still reports the end of the log.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def render_job(engine: Mapping[str, Any], attempt: int, store: StoreRef, settings: JobSettings) -> dict[str, Any]:
    """One attempt to build (or find) the engine, on a node of its GPU product (and the Engine's nodeSelector,
    with its tolerations: those of the service that created it), owned by the Engine."""
    meta, spec = engine["metadata"], engine["spec"]
    name = job_name(meta["name"], attempt)
    job_labels = {MANAGED: labels.MANAGER, ENGINE_LABEL: meta["name"], COMPONENT: "engine-build"}
    model_volumes, _ = _model_volumes(spec)
    per_attempt = int(spec["buildTimeoutSeconds"])
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "nodeSelector": {**(spec.get("nodeSelector") or {}), labels.NODE_GPU_PRODUCT: spec["gpu"]["product"]},
        "tolerations": [*(dict(t) for t in spec.get("tolerations") or ()), GPU_TOLERATION],
        "containers": [_container(engine, store, settings)],
        "volumes": [{"name": "work", "emptyDir": {"sizeLimit": settings.work_size_limit}},
                    *store.volumes(read_only=False), *model_volumes],
        "automountServiceAccountToken": False,  # the Job reports through its termination message only
        "enableServiceLinks": False,
    }
    if settings.namespace_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.namespace_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name, "namespace": meta.get("namespace"), "labels": job_labels,
            "annotations": {FINGERPRINT_ANNOTATION: str((engine.get("status") or {}).get("fingerprint") or "")},
            "ownerReferences": [labels.owner_reference(meta["name"], meta.get("uid", ""), kind="Engine")],
        },
        "spec": {
            "backoffLimit": settings.retries,
            "activeDeadlineSeconds": per_attempt * (settings.retries + 1) + 900,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": job_labels}, "spec": pod_spec},
        },
    }


# ---- reading results ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PodResult:
    """One finished attempt: the pod, when it ended, and what ``ensure`` reported."""

    pod: str
    finished_at: str
    exit_code: int
    report: Mapping[str, Any]


def pod_result(pod: Mapping[str, Any], container: str = CONTAINER) -> PodResult | None:
    """The terminated state of ``container`` in ``pod``, its termination message parsed; None if running."""
    status = pod.get("status") or {}
    for cs in (*(status.get("initContainerStatuses") or ()), *(status.get("containerStatuses") or ())):
        if cs.get("name") != container:
            continue
        terminated = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not terminated:
            return None
        return PodResult(pod=str(pod.get("metadata", {}).get("name", "")),
                         finished_at=str(terminated.get("finishedAt") or ""),
                         exit_code=int(terminated.get("exitCode") or 0),
                         report=parse_message(terminated))
    return None


def parse_message(terminated: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report, or (a crash, an OOM kill) a failure built from the kubelet's reason and the log tail."""
    text = str(terminated.get("message") or "")
    try:
        report = json.loads(text)
        if isinstance(report, dict) and "result" in report:
            return report
    except ValueError:
        pass
    reason = str(terminated.get("reason") or "Error")
    code = terminated.get("exitCode")
    return {"result": "failed", "reason": f"Container{reason}",
            "message": f"the {CONTAINER} container ended ({reason}, exit code {code}) without a report",
            "logTail": text[-2000:]}


def job_name_of(pod: Mapping[str, Any]) -> str | None:
    """The Job a pod belongs to (the Job controller's ``job-name`` label)."""
    return ((pod.get("metadata") or {}).get("labels") or {}).get("job-name")


def job_results(pods: Iterable[Mapping[str, Any]]) -> list[PodResult]:
    """Finished attempts of one Job, oldest first."""
    found = [r for r in (pod_result(p) for p in pods) if r is not None]
    return sorted(found, key=lambda r: (r.finished_at, r.pod))


# A container that cannot start for these reasons will not start by waiting: the attempt fails after a grace period.
START_FAILURES = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                            "CreateContainerConfigError", "CreateContainerError"})


@dataclasses.dataclass(frozen=True)
class PodProblem:
    """Why a build pod has not started: a container ``waiting`` for a reason in START_FAILURES (``fatal``), or
    the scheduler's ``PodScheduled=False`` (Unschedulable: a node may still come, say from an autoscaler)."""

    pod: str
    reason: str
    message: str
    since: str  # when the pod was created (a container's start) or the scheduling condition last changed
    fatal: bool


def pod_problem(pod: Mapping[str, Any]) -> PodProblem | None:
    """What keeps ``pod`` from starting, or None when nothing does (it runs, or its containers are starting)."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    name = str(meta.get("name", ""))
    for cs in (*(status.get("initContainerStatuses") or ()), *(status.get("containerStatuses") or ())):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in START_FAILURES:
            return PodProblem(name, str(waiting["reason"]), str(waiting.get("message") or ""),
                              str(status.get("startTime") or meta.get("creationTimestamp") or ""), fatal=True)
    for cond in status.get("conditions") or ():
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return PodProblem(name, str(cond.get("reason") or "Unschedulable"), str(cond.get("message") or ""),
                              str(cond.get("lastTransitionTime") or meta.get("creationTimestamp") or ""), fatal=False)
    return None


def job_failed(job: Mapping[str, Any]) -> tuple[bool, str, str]:
    """(failed, reason, message) from the Job controller's conditions (backoff limit, deadline)."""
    for cond in (job.get("status") or {}).get("conditions") or ():
        if cond.get("type") == "Failed" and cond.get("status") == "True":
            return True, str(cond.get("reason") or "JobFailed"), str(cond.get("message") or "")
    return False, "", ""


def job_finished(job: Mapping[str, Any]) -> bool:
    for cond in (job.get("status") or {}).get("conditions") or ():
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return True
    return False
