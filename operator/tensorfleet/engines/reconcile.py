"""The Engine reconcile: an Engine, its Jobs and their Pods in; the Job to create, Jobs to delete and status out.

Pure and level-based like the InferenceService reconcile. One attempt is one Job named
``<engine>-<attempt>``; a new attempt starts only when no other Job of the Engine is wanted, so one
fingerprint never has two build Jobs at once (the API server refuses a second Job of the same name).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from tensorfleet.api import crds
from tensorfleet.api.schema import FieldError
from tensorfleet.engines import jobs, trtllm
from tensorfleet.engines.fingerprint import key_of_body
from tensorfleet.engines.storeref import StoreRef, resolve
from tensorfleet.status import Condition, Event, merge_conditions, timestamp

SUCCESS = ("cache", "build")


@dataclasses.dataclass(frozen=True)
class CorruptionReport:
    """A serving pod's engine-fetch init container found the artifact corrupt."""

    pod: str
    finished_at: str
    sha256: str
    message: str


@dataclasses.dataclass(frozen=True)
class EngineObserved:
    jobs: tuple[Mapping[str, Any], ...] = ()
    pods: tuple[Mapping[str, Any], ...] = ()
    corruption: tuple[CorruptionReport, ...] = ()


@dataclasses.dataclass(frozen=True)
class EngineContext:
    default_store: StoreRef | None = None
    job_settings: jobs.JobSettings = dataclasses.field(default_factory=jobs.JobSettings)
    retry_base_seconds: float = 300.0
    retry_max_seconds: float = 3600.0
    start_grace_seconds: float = 600.0  # a build pod that cannot start (jobs.START_FAILURES) fails past this


@dataclasses.dataclass(frozen=True)
class BuildOutcome:
    """An attempt whose outcome this pass records in status for the first time (what metrics count)."""

    result: str  # built (trtllm-build ran), cached (the store had it), failed
    seconds: float | None = None  # the build's own time, from its report


@dataclasses.dataclass(frozen=True)
class EnginePlan:
    create: dict[str, Any] | None
    delete: tuple[str, ...]
    status: dict[str, Any]
    events: tuple[Event, ...]
    finished: tuple[BuildOutcome, ...] = ()


def spec_errors(body: Mapping[str, Any], ctx: EngineContext) -> list[FieldError]:
    """What the CRD schema cannot check: the name must be the fingerprint's, options must be real flags."""
    errors = trtllm.build_option_errors((body.get("spec") or {}).get("buildOptions") or {})
    expected = key_of_body(body).name
    if body["metadata"]["name"] != expected:
        errors.append(FieldError("metadata.name", f"Invalid value: {body['metadata']['name']!r}: must be {expected!r}, "
                                 "derived from the spec's fingerprint (tensorfleet engine key -f FILE)"))
    if resolve(body["spec"], ctx.default_store) is None:
        errors.append(FieldError("spec.storeRef", "Required value: no engine store: set spec.storeRef or the "
                                 "operator's --engine-store"))
    return errors


def _parse_time(text: str | None, fallback: datetime.datetime) -> datetime.datetime:
    try:
        return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return fallback


def _artifact(report: Mapping[str, Any]) -> dict[str, Any]:
    keys = (("uri", "uri"), ("sha256", "sha256"), ("sizeBytes", "sizeBytes"), ("builtAt", "builtAt"),
            ("buildSeconds", "buildSeconds"))
    found = {out: report[src] for out, src in keys if report.get(src) is not None}
    return {**found, "source": report["result"]}


@dataclasses.dataclass
class _State:
    """The status being built for one pass."""

    attempts: int
    artifact: dict[str, Any] | None
    failure: dict[str, Any] | None
    corruption: dict[str, Any] | None
    conditions: list[Condition] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)
    create: dict[str, Any] | None = None
    delete: list[str] = dataclasses.field(default_factory=list)
    finished: list[BuildOutcome] = dataclasses.field(default_factory=list)


def reconcile_engine(body: Mapping[str, Any], observed: EngineObserved, ctx: EngineContext,
                     now: datetime.datetime) -> EnginePlan:
    body = crds.default(body)  # as the API server stores it (objects stored before a default was added too)
    meta = body["metadata"]
    previous = dict(body.get("status") or {})
    generation = int(meta.get("generation") or 0)
    key = key_of_body(body)
    state = _State(attempts=int(previous.get("attempts") or 0), artifact=previous.get("artifact"),
                   failure=previous.get("failure"), corruption=previous.get("corruption"))
    errors = spec_errors(body, ctx)
    if errors:
        _invalid(state, errors)
    else:
        store = resolve(body["spec"], ctx.default_store)
        assert store is not None
        _advance(body, observed, ctx, now, state, key.sha256, store)
    status: dict[str, Any] = {"observedGeneration": generation, "fingerprint": key.sha256,
                              "attempts": state.attempts}
    if state.attempts:
        status["job"] = jobs.job_name(meta["name"], state.attempts)
    for field, value in (("artifact", state.artifact), ("failure", state.failure), ("corruption", state.corruption)):
        status[field] = value  # None removes the field (a merge patch)
    status["conditions"] = merge_conditions(previous.get("conditions") or [], state.conditions, generation, now)
    events = _transition_events(previous.get("conditions") or [], state.conditions) + state.events
    return EnginePlan(state.create, tuple(state.delete), status, tuple(events), tuple(state.finished))


def _invalid(state: _State, errors: Sequence[FieldError]) -> None:
    message = "; ".join(str(e) for e in errors)
    state.conditions = [Condition("Ready", "False", "InvalidSpec", message),
                        Condition("Building", "False", "InvalidSpec", "nothing is built until the spec is fixed"),
                        Condition("Failed", "True", "InvalidSpec", message)]


def _advance(body: Mapping[str, Any], observed: EngineObserved, ctx: EngineContext, now: datetime.datetime,
             state: _State, fingerprint: str, store: StoreRef) -> None:
    name = body["metadata"]["name"]
    current = jobs.job_name(name, state.attempts) if state.attempts else None
    by_name = {j["metadata"]["name"]: j for j in observed.jobs}
    job = by_name.get(current) if current else None
    results = jobs.job_results(p for p in observed.pods if jobs.job_name_of(p) == current)
    succeeded = [r for r in results if r.report.get("result") in SUCCESS and r.report.get("fingerprint") == fingerprint]
    report = _new_corruption(state, observed.corruption)
    if report is not None:
        # Pods already running verified their own copy and keep serving; the artifact stays recorded until
        # the re-verification (cache) or rebuild (build) Job reports, then it is replaced.
        state.corruption = {"pod": report.pod, "finishedAt": report.finished_at, "message": report.message[:2000],
                            "sha256": report.sha256, "resolved": False}
        state.events.append(Event("Warning", "ArtifactCorrupt", f"{report.pod}: {report.message}"[:1024]))
        _start_attempt(body, ctx, state, store, by_name, "a serving pod found the artifact corrupt: "
                       "re-verifying the stored copy, rebuilding it if it is corrupt", force_new=True)
        return
    rebuilding = state.artifact is not None and state.corruption is not None and not state.corruption.get("resolved")
    if (state.artifact is None or rebuilding) and succeeded:
        state.artifact = _artifact(succeeded[-1].report)
        state.finished.append(_outcome(succeeded[-1].report))
        state.failure = None
        if state.corruption is not None and not state.corruption.get("resolved"):
            state.corruption = {**state.corruption, "resolved": True, "resolvedAt": timestamp(now)}
        rebuilding = False
    if state.artifact is not None and not rebuilding:
        _ready(state, by_name, observed)
        return
    failed, job_reason, job_message = jobs.job_failed(job) if job is not None else (False, "", "")
    if job is None and state.failure is not None and state.failure.get("job") == current:
        _backoff(body, ctx, now, state, store, by_name)  # recorded as failed, then deleted (TTL, by hand)
    elif job is None:
        _start_attempt(body, ctx, state, store, by_name, "building" if not state.attempts else "job missing: again")
    elif failed:
        _failed(body, ctx, now, state, store, by_name, results, job_reason, job_message)
    elif jobs.job_finished(job) and not any(jobs.job_name_of(p) == current for p in observed.pods):
        # Complete, and its pod went before its report was read (its node scaled away, PodGC): run it again,
        # a cache hit if it built; waiting would wait for the Job's TTL
        state.events.append(Event("Warning", "ReportLost", f"Job {current} finished but its pod is gone"))
        _start_attempt(body, ctx, state, store, by_name, f"Job {current} finished but its pod, with its report, "
                       "is gone: trying again", force_new=True)
    else:
        _running(body, ctx, now, state, store, by_name, observed.pods, results)


def _running(body: Mapping[str, Any], ctx: EngineContext, now: datetime.datetime, state: _State, store: StoreRef,
             by_name: Mapping[str, Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
             results: Sequence[jobs.PodResult]) -> None:
    """The current Job runs: building, or its pod cannot start (an image that cannot be pulled, no node to
    schedule on), which status says at once; one that cannot start by waiting fails past the grace period."""
    current = jobs.job_name(body["metadata"]["name"], state.attempts)
    problem = _start_problem(pods, current, results)
    if problem is not None and problem.fatal and now >= _grace_end(problem, ctx, now):
        state.delete.append(current)  # its pods would wait until the Job's deadline, hours away
        _failed(body, ctx, now, state, store, by_name, results, problem.reason,
                f"pod {problem.pod} could not start: {problem.message}")
        return
    if problem is not None:
        until = f"; the attempt fails at {timestamp(_grace_end(problem, ctx, now))}" if problem.fatal else ""
        why = f"pod {problem.pod} cannot start: {problem.reason}: {problem.message}{until}"
        state.conditions = [Condition("Ready", "False", problem.reason, f"Job {current}: {why}"[:4000]),
                            Condition("Building", "True", problem.reason, f"attempt {state.attempts}: {why}"[:4000]),
                            _failed_condition(state)]
        return
    last = results[-1].report if results else None
    note = f"; the previous try failed: {last.get('reason')}: {last.get('message')}" if last else ""
    state.conditions = [
        Condition("Ready", "False", "Building", f"Job {current} is building or fetching the engine"),
        Condition("Building", "True", "JobRunning", f"attempt {state.attempts}: Job {current}{note}"),
        _failed_condition(state),
    ]


def _start_problem(pods: Sequence[Mapping[str, Any]], job_name: str,
                   results: Sequence[jobs.PodResult]) -> jobs.PodProblem | None:
    """What keeps the Job's unfinished pod from starting (the Job runs one pod at a time), or None."""
    finished = {r.pod for r in results}
    for pod in pods:
        meta = pod.get("metadata") or {}
        if jobs.job_name_of(pod) == job_name and meta.get("name") not in finished:
            problem = jobs.pod_problem(pod)
            if problem is not None:
                return problem
    return None


def _grace_end(problem: jobs.PodProblem, ctx: EngineContext, now: datetime.datetime) -> datetime.datetime:
    return _parse_time(problem.since, now) + datetime.timedelta(seconds=ctx.start_grace_seconds)


def _outcome(report: Mapping[str, Any]) -> BuildOutcome:
    seconds = report.get("buildSeconds")
    return BuildOutcome("built" if report.get("result") == "build" else "cached",
                        float(seconds) if isinstance(seconds, int | float) else None)


def _new_corruption(state: _State, reports: Sequence[CorruptionReport]) -> CorruptionReport | None:
    """The report that starts a re-verification, or None. One corrupt artifact gets one rebuild: while the
    rebuild of this artifact's sha256 runs, further reports (other replicas, or the same pod's init container
    after each CrashLoopBackOff restart) are only recorded (``lastReportAt``), so none of them cancels it."""
    if state.artifact is None:
        return None
    sha = state.artifact.get("sha256")
    corruption = state.corruption or {}
    # reports that ended before the last rebuild finished are about the copy it replaced or re-verified
    seen = max(str(corruption.get(field) or "") for field in ("finishedAt", "lastReportAt", "resolvedAt"))
    fresh = [r for r in reports if r.sha256 == sha and r.finished_at > seen]
    if not fresh:
        return None
    latest = max(fresh, key=lambda r: r.finished_at)
    # status from before sha256 was recorded: an unresolved corruption was the current artifact's
    if corruption and not corruption.get("resolved") and corruption.get("sha256", sha) == sha:
        state.corruption = {**corruption, "lastReportAt": latest.finished_at}
        return None
    return latest


def _ready(state: _State, by_name: Mapping[str, Mapping[str, Any]], observed: EngineObserved) -> None:
    artifact = state.artifact or {}
    # The result is recorded: finished Jobs have served their purpose (their pods go with them).
    for job_name, job in by_name.items():
        pods = [p for p in observed.pods if jobs.job_name_of(p) == job_name]
        if jobs.job_finished(job) or any(r.report.get("result") in SUCCESS for r in jobs.job_results(pods)):
            state.delete.append(job_name)
    source = artifact.get("source", "")
    state.conditions = [
        Condition("Ready", "True", "Available",
                  f"artifact {artifact.get('sha256')} ({source}) at {artifact.get('uri')}"),
        Condition("Building", "False", "Complete", "the engine is built and verified"),
        Condition("Failed", "False", "NoFailure", "the latest attempt succeeded"),
    ]


def _failed_condition(state: _State) -> Condition:
    if state.failure:
        return Condition("Failed", "True", str(state.failure.get("reason") or "BuildFailed"),
                         f"{state.failure.get('message')} (log tail in status.failure.logTail)")
    return Condition("Failed", "False", "NoFailure", "no attempt has failed")


def _failed(body: Mapping[str, Any], ctx: EngineContext, now: datetime.datetime, state: _State, store: StoreRef,
            by_name: Mapping[str, Mapping[str, Any]], results: Sequence[jobs.PodResult], job_reason: str,
            job_message: str) -> None:
    current = jobs.job_name(body["metadata"]["name"], state.attempts)
    last = results[-1].report if results else {}
    previous = state.failure or {}
    if previous.get("job") == current:
        finished_at = str(previous.get("finishedAt"))
    else:  # this attempt's failure is recorded now
        finished_at = results[-1].finished_at if results and results[-1].finished_at else timestamp(now)
        state.finished.append(BuildOutcome("failed"))
    delay = min(ctx.retry_max_seconds, ctx.retry_base_seconds * 2 ** max(0, state.attempts - 1))
    retry_at = _parse_time(finished_at, now) + datetime.timedelta(seconds=delay)
    reason = str(last.get("reason") or job_reason or "BuildFailed")
    message = str(last.get("message") or job_message or "the build Job failed")
    if job_reason and job_reason != reason:
        message = f"{message} (Job: {job_reason}: {job_message})"
    state.failure = {"job": current, "reason": reason, "message": message[:4000],
                     "logTail": str(last.get("logTail") or "")[-4000:], "finishedAt": finished_at,
                     "retryAt": timestamp(retry_at)}
    _backoff(body, ctx, now, state, store, by_name)


def _backoff(body: Mapping[str, Any], ctx: EngineContext, now: datetime.datetime, state: _State, store: StoreRef,
             by_name: Mapping[str, Mapping[str, Any]]) -> None:
    """The current attempt failed (``state.failure``): the next, a new attempt, starts at its ``retryAt``."""
    failure = state.failure or {}
    reason, message = failure.get("reason"), failure.get("message")
    retry_at = _parse_time(failure.get("retryAt"), now)
    if now >= retry_at:
        _start_attempt(body, ctx, state, store, by_name, f"retrying after: {reason}", force_new=True)
        return
    state.conditions = [
        Condition("Ready", "False", "BuildFailed", f"attempt {state.attempts} failed: {reason}: {message}"[:4000]),
        Condition("Building", "False", "BackingOff", f"the next attempt starts at {timestamp(retry_at)}"),
        _failed_condition(state),
    ]


def _start_attempt(body: Mapping[str, Any], ctx: EngineContext, state: _State, store: StoreRef,
                   by_name: Mapping[str, Mapping[str, Any]], why: str, force_new: bool = False) -> None:
    name = body["metadata"]["name"]
    current = jobs.job_name(name, state.attempts) if state.attempts else None
    # A Job that exists is never re-created; one not seen yet (just created) is re-sent, which is a no-op.
    if current is None or current in by_name or force_new:
        state.attempts += 1
    new = jobs.job_name(name, state.attempts)
    state.delete.extend(n for n in by_name if n != new and n not in state.delete)  # superseded attempts: cancelled
    state.create = jobs.render_job(body, state.attempts, store, ctx.job_settings)
    state.conditions = [
        Condition("Ready", "False", "Building", f"Job {new} is building or fetching the engine"),
        Condition("Building", "True", "JobStarted", f"attempt {state.attempts}: {why}"),
        _failed_condition(state),
    ]


def _transition_events(previous: Sequence[Mapping[str, Any]], current: Sequence[Condition]) -> list[Event]:
    before = {c.get("type"): c for c in previous}
    events = []
    for cond in current:
        old = before.get(cond.type) or {}
        if old.get("status") == cond.status and old.get("reason") == cond.reason:
            continue
        if cond.type == "Ready" and cond.status == "True":
            events.append(Event("Normal", "EngineReady", cond.message))
        elif cond.type == "Failed" and cond.status == "True":
            events.append(Event("Warning", cond.reason, cond.message[:1024]))
        elif cond.type == "Building" and cond.status == "True" and cond.reason not in ("JobStarted", "JobRunning"):
            events.append(Event("Warning", cond.reason, cond.message[:1024]))  # its pod cannot start
    return events
