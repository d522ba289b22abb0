"""`tensorfleet run` with no cluster: the real operator, end to end, against the embedded API emulator.

It starts the emulator (with simulated GPU nodes and kubelets), starts the operator against it,
applies the example manifest exactly as ``kubectl apply`` would send it, and prints the child
objects and status conditions as they converge. Then it watches the converged service for a few
seconds and reports how many writes the operator made (it must be zero).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.resources
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import click
import yaml

from tensorfleet import __version__, cli_files, kube
from tensorfleet.api import manifest_yaml
from tensorfleet.metrics import OperatorMetrics
from tensorfleet.sandbox.apiserver import EmulatorThread
from tensorfleet.sandbox.kubelet import SimulatedDeploymentController, seed_nodes
from tensorfleet.settings import OperatorSettings

QUIET_SECONDS = 5.0
CHILDREN = (("v1", "configmaps"), ("apps/v1", "deployments"), ("v1", "services"), ("policy/v1", "poddisruptionbudgets"))


class Narrator:
    """Prints what happens, with the time since the start."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()

    def say(self, what: str, detail: str = "") -> None:
        elapsed = time.monotonic() - self.started
        self.out.write(f"  t+{elapsed:5.1f}s  {what:<44} {detail}\n".rstrip() + "\n")
        self.out.flush()


EXAMPLE_FLAG = "--example (TENSORFLEET_EXAMPLE)"


def example_manifests(path: str | None) -> list[dict[str, Any]]:
    """The manifests of ``path``, or of examples/inferenceservice.yaml as the package ships it (so the quickstart
    runs from any folder). A file that cannot be read or is not YAML is a usage error naming the flag."""
    if path is None:
        text = importlib.resources.files("tensorfleet.sandbox").joinpath("example.yaml").read_text(encoding="utf-8")
    else:
        text = cli_files.read_text(path, EXAMPLE_FLAG)
    try:
        docs = [doc for doc in manifest_yaml.load_all(text) if doc]
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{path}: not valid YAML: {exc}", param_hint=EXAMPLE_FLAG) from None
    for index, doc in enumerate(docs):
        problem = _object_problem(doc)
        if problem:
            raise click.BadParameter(f"{path}: document {index}: {problem}", param_hint=EXAMPLE_FLAG)
    return docs


def _object_problem(doc: Any) -> str | None:
    """Why ``doc`` is not an object the quickstart can create and watch, or None."""
    expected = "expected a Kubernetes object (a mapping with apiVersion, kind and metadata.name)"
    if not isinstance(doc, dict):
        shape = "a list" if isinstance(doc, list) else f"the scalar {doc!r:.40}"
        return f"{shape}, {expected}"
    metadata = doc.get("metadata")
    if not all(isinstance(doc.get(field), str) for field in ("apiVersion", "kind")) or not (
            isinstance(metadata, dict) and isinstance(metadata.get("name"), str)):
        return expected
    try:
        kube.resource_for(doc["apiVersion"], doc["kind"])
    except ValueError as exc:
        return str(exc)
    return None


def _describe(obj: Mapping[str, Any]) -> str:
    kind, spec = obj["kind"], obj.get("spec") or {}
    if kind == "Deployment":
        pod = spec["template"]["spec"]
        engine = pod["containers"][0]
        gpus = engine["resources"]["limits"].get("nvidia.com/gpu")
        return f"{spec.get('replicas')} replica(s), {gpus}x nvidia.com/gpu, {' '.join(engine['args'][:3])} ..."
    if kind == "Service":
        return f"port {spec['ports'][0]['port']} -> gateway"
    if kind == "PodDisruptionBudget":
        return f"maxUnavailable {spec.get('maxUnavailable')}"
    return ""


def _conditions(status: Mapping[str, Any]) -> str:
    return "  ".join(f"{c['type']}={c['status']} ({c['reason']})" for c in status.get("conditions") or ())


class Watcher:
    """Polls the emulator and narrates new children and status changes."""

    def __init__(self, emulator: EmulatorThread, narrator: Narrator, namespace: str, name: str) -> None:
        self.emulator, self.narrator, self.namespace, self.name = emulator, narrator, namespace, name
        self.seen: dict[tuple[str, str], str] = {}
        self.last_status = ""

    def isvc(self) -> dict[str, Any] | None:
        found = [o for o in self.emulator.objects("tensorfleet.io/v1alpha1", "inferenceservices", self.namespace)
                 if o["metadata"]["name"] == self.name]
        return found[0] if found else None

    def poll(self) -> dict[str, Any] | None:
        for api_version, plural in CHILDREN:
            for obj in self.emulator.objects(api_version, plural, self.namespace):
                key = (obj["kind"], obj["metadata"]["name"])
                version = obj["metadata"]["resourceVersion"]
                if key not in self.seen:
                    self.narrator.say(f"{obj['kind']} {self.namespace}/{key[1]} created", _describe(obj))
                self.seen[key] = version
        isvc = self.isvc()
        status = _conditions((isvc or {}).get("status") or {})
        if status and status != self.last_status:
            self.narrator.say("status", status)
            self.last_status = status
        return isvc


def _ready(isvc: Mapping[str, Any] | None) -> bool:
    for cond in ((isvc or {}).get("status") or {}).get("conditions") or ():
        if cond["type"] == "Ready" and cond["status"] == "True":
            return True
    return False


def _start_operator(settings: OperatorSettings, metrics: OperatorMetrics) -> tuple[threading.Thread, threading.Event]:
    from tensorfleet.runner import run_operator

    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=run_operator, args=(settings, stop, ready, metrics), name="operator", daemon=True)
    thread.start()
    if not ready.wait(timeout=60):
        raise RuntimeError("the operator did not start within 60 s")
    return thread, stop


def _apply(emulator: EmulatorThread, docs: list[dict[str, Any]], narrator: Narrator) -> list[tuple[str, str]]:
    """Create ``docs``; the namespace and name of each InferenceService among them (those are watched)."""
    async def create_all() -> list[tuple[str, str, str]]:
        client = kube.KubeClient(kube.Connection(server=emulator.url))
        created = []
        try:
            for doc in docs:
                doc["metadata"].setdefault("namespace", "default")
                await client.create(doc)
                created.append((doc["kind"], doc["metadata"]["namespace"], doc["metadata"]["name"]))
        finally:
            await client.aclose()
        return created

    created = asyncio.run(create_all())
    for kind, namespace, name in created:
        narrator.say(f"applied {kind} {namespace}/{name}")
    return [(namespace, name) for kind, namespace, name in created if kind == "InferenceService"]


def _simulate(emulator: EmulatorThread, startup_seconds: float) -> Callable[[], None]:
    stop = asyncio.Event()

    async def start() -> None:
        client = kube.KubeClient(kube.Connection(server=emulator.url))
        await seed_nodes(client)
        controller = SimulatedDeploymentController(client, startup_seconds=startup_seconds)
        asyncio.get_running_loop().create_task(controller.run(stop))

    emulator.call(start)
    return lambda: emulator.call(_set(stop))


def _set(event: asyncio.Event) -> Callable[[], Any]:
    async def setter() -> None:
        event.set()

    return setter


class _NotInMainThread(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "running not in the main thread" not in record.getMessage()


def run(settings: OperatorSettings, out: TextIO = sys.stdout, startup_seconds: float = 2.0) -> int:
    docs = example_manifests(settings.example)
    out.write(f"tensorfleet {__version__}: no cluster configured (no kubeconfig, not in a pod).\n"
              "Running the operator end to end against an embedded Kubernetes API emulator\n"
              "(kmock KubernetesEmulator; GPU nodes and kubelets are simulated). With a kubeconfig,\n"
              "`tensorfleet run` is the real operator.\n\n")
    narrator = Narrator(out)
    for handler in logging.getLogger().handlers:  # the operator runs in a thread here, by design
        handler.addFilter(_NotInMainThread())
    with EmulatorThread() as emulator:
        out.write(f"  emulator at {emulator.url}\n")
        stop_simulation = _simulate(emulator, startup_seconds)
        ours = dataclasses.replace(settings, server=emulator.url, standalone=True, liveness_port=0, metrics_port=0,
                                   resync_seconds=min(settings.resync_seconds, 30.0))
        operator, stop = _start_operator(ours, OperatorMetrics())
        narrator.say("operator started")
        try:
            created = _apply(emulator, docs, narrator)
            code = _converge(emulator, narrator, created, settings.demo_timeout_seconds, out)
        except kube.APIError as exc:
            out.write(f"\nthe API server rejected {settings.example or 'the example'}:\n  {exc.message}\n")
            code = 1
        finally:
            stop.set()
            operator.join(timeout=30)
            stop_simulation()
    return code


def _writes(emulator: EmulatorThread) -> int:
    """Every write the API server received (the operator's, kopf's and the simulated kubelets')."""
    return len(emulator.server.writes)


def _converge(emulator: EmulatorThread, narrator: Narrator, created: list[tuple[str, str]], timeout: float,
              out: TextIO) -> int:
    watchers = [Watcher(emulator, narrator, ns, name) for ns, name in created]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_ready(w.poll()) for w in watchers):
            break
        time.sleep(0.1)
    else:
        out.write(f"\nnot Ready within {timeout:.0f} s\n")
        return 1
    narrator.say("converged: every service is Ready")
    _settle(emulator)  # the last pass may still post its Ready event
    before = _writes(emulator)
    time.sleep(QUIET_SECONDS)
    quiet_writes = _writes(emulator) - before
    narrator.say(f"API writes in the next {QUIET_SECONDS:.0f} s (must be 0)", str(quiet_writes))
    out.write("\n" + _table(watchers))
    return 0 if quiet_writes == 0 else 1


def _settle(emulator: EmulatorThread, quiet: float = 1.0, limit: float = 10.0) -> None:
    """Wait until no write has arrived for ``quiet`` seconds (at most ``limit``)."""
    deadline = time.monotonic() + limit
    count, since = _writes(emulator), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.05)
        if _writes(emulator) != count:
            count, since = _writes(emulator), time.monotonic()


def _table(watchers: list[Watcher]) -> str:
    """The service as `kubectl get inferenceservices` prints it (the CRD's printer columns)."""
    rows = [("NAME", "RUNTIME", "MODEL", "READY", "REPLICAS", "GPU")]
    for watcher in watchers:
        isvc = watcher.isvc() or {}
        spec, status = isvc.get("spec", {}), isvc.get("status", {})
        rows.append((watcher.name, spec["runtime"]["name"], spec["model"]["uri"], "True" if _ready(isvc) else "False",
                     str(status.get("replicas", 0)), status.get("gpu", "")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
                   for row in rows)
