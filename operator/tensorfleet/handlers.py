"""Which kopf handlers an operator process runs, chosen from its settings before kopf starts.

kopf builds an operator from a registry of handlers before it starts and does not add or remove
handlers while it runs. Most of tensorfleet's handlers always run, but an index on an API the
operator may not read must not exist at all: kopf retries a forbidden list of an indexed resource
(nine times over about a minute, one error line each), holds every other handler back meanwhile
(indices must be filled before handlers run), and then stops the whole operator. That is what would
happen with KEDA installed in the cluster but the chart's ``autoscaling.keda`` off (no RBAC for
ScaledObjects), or HorizontalPodAutoscalers with ``autoscaling.hpa`` off.

So the modules with handlers declare them here instead of registering them in kopf's global
registry: ``@handlers.declare(kopf.index, "apps", "v1", "deployments", labels=...)`` takes exactly
kopf's decorator and arguments, plus an optional ``only_if(settings)``. ``build(settings)`` makes a
fresh ``kopf.OperatorRegistry`` with the handlers those settings allow; ``runner.run_operator`` (and
the tests, through ``KopfRunner(registry=...)``) run the operator with it. Passing a registry to kopf's
decorators and to ``kopf.operator`` is kopf's documented way to form an operator explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kopf

from tensorfleet.settings import OperatorSettings

F = TypeVar("F", bound=Callable[..., Any])
SettingsCondition = Callable[[OperatorSettings], bool]


@dataclasses.dataclass(frozen=True)
class Declaration:
    """One handler: kopf's decorator, its arguments, the function, and when it is registered."""

    decorator: Callable[..., Callable[[Any], Any]]
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    fn: Callable[..., Any]
    only_if: SettingsCondition | None

    def wanted(self, settings: OperatorSettings) -> bool:
        return self.only_if is None or self.only_if(settings)


_DECLARED: list[Declaration] = []


def declare(decorator: Callable[..., Callable[[Any], Any]], *args: Any, only_if: SettingsCondition | None = None,
            **kwargs: Any) -> Callable[[F], F]:
    """``decorator(*args, **kwargs)`` (a ``kopf.on.*``/``kopf.index``/``kopf.daemon`` decorator) for the registry
    ``build`` makes, applied only when ``only_if(settings)`` holds. Returns the function unchanged."""
    if "registry" in kwargs:
        raise TypeError("handlers.declare: the registry is chosen by build(settings)")

    def record(fn: F) -> F:
        _DECLARED.append(Declaration(decorator, args, dict(kwargs), fn, only_if))
        return fn

    return record


def declared() -> tuple[Declaration, ...]:
    return tuple(_DECLARED)


def build(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """A fresh registry with every declared handler that ``settings`` allow, its daemons without finalizers."""
    registry = kopf.OperatorRegistry()
    for declaration in _DECLARED:
        if declaration.wanted(settings):
            declaration.decorator(*declaration.args, registry=registry, **declaration.kwargs)(declaration.fn)
    _without_finalizers(registry)
    return registry


def _without_finalizers(registry: kopf.OperatorRegistry) -> None:
    """Daemons that put no finalizer on the objects they serve.

    ``kopf.daemon`` always marks its handler ``requires_finalizer`` (kopf has no option for it; nolar/kopf#896,
    which proposed one, was closed), so that no object vanishes before kopf has stopped its daemons. But only a
    running operator removes that finalizer: with the operator uninstalled, scaled to 0 or crash-looping, deleting
    an InferenceService or Engine, its namespace or the CRD would hang, and the children would never be collected.
    tensorfleet has nothing to do on deletion (owner references collect the children), so its daemons end on
    their object's DELETED event instead (``triggers.Triggers.deleted``; where the watch missed it, before their
    first write: ``kube.KubeClient.acting_for``), and on kopf's own stop as before:
    pause by a peer, shutdown, a deletion that other finalizers hold back. This flag is the only thing kopf
    reads to decide on the finalizer (``SpawningRegistry.requires_finalizer``); tests/integration/test_operator.py
    fails if a kopf upgrade moves it.
    """
    spawning = registry._spawning._handlers
    spawning[:] = [dataclasses.replace(handler, requires_finalizer=False) for handler in spawning]
