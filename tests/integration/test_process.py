"""The operator process as deployed: `tensorfleet run` with metrics, liveness and structured logs."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import httpx
import kopf
import pytest
from click.testing import CliRunner

from builders import inference_service
from cluster import Cluster, wait_for
from engines.processes import free_port
from tensorfleet import controller
from tensorfleet.cli import main
from tensorfleet.sandbox.apiserver import EmulatorThread
from tensorfleet.settings import OperatorSettings

pytestmark = pytest.mark.integration
ROOT = pathlib.Path(__file__).resolve().parents[2]
QUIET = ["--standalone", "--liveness-port", "0", "--metrics-port", "0", "--log-format", "plain"]


def test_metrics_liveness_and_json_logs(emulator: EmulatorThread, tmp_path: pathlib.Path) -> None:
    metrics_port, liveness_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORFLEET_")}
    env.update(TENSORFLEET_SERVER=emulator.url, TENSORFLEET_STANDALONE="true", TENSORFLEET_LOG_FORMAT="json",
               TENSORFLEET_METRICS_PORT=str(metrics_port), TENSORFLEET_LIVENESS_PORT=str(liveness_port),
               TENSORFLEET_RESYNC_SECONDS="1")
    log = (tmp_path / "operator.log").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "tensorfleet", "run"], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    cluster = Cluster(emulator)
    try:
        cluster.create(inference_service("llama"))
        wait_for(lambda: cluster.condition("llama", "Progressing"), what="status")
        health = wait_for(lambda: _get(f"http://127.0.0.1:{liveness_port}/healthz"), what="liveness endpoint")
        assert health.status_code == 200
        metrics = wait_for(lambda: (m := _get(f"http://127.0.0.1:{metrics_port}/metrics")) and
                           'tensorfleet_reconcile_total{result="ok"}' in m.text and m, what="reconcile metrics")
        for name in ("tensorfleet_reconcile_duration_seconds_bucket", "tensorfleet_api_writes_total",
                     "tensorfleet_inferenceservices 1.0", "tensorfleet_reconcile_errors_total",
                     # the dashboard's replicas panel: what the service asks for, and what is ready
                     'tensorfleet_inferenceservice_desired_replicas{inferenceservice="llama",namespace="default"} 1.0',
                     'tensorfleet_inferenceservice_ready_replicas{inferenceservice="llama",namespace="default"} 0.0'):
            assert name in metrics.text
        cluster.delete("tensorfleet.io/v1alpha1", "InferenceService", "llama")
        wait_for(lambda: (m := _get(f"http://127.0.0.1:{metrics_port}/metrics")) and
                 "tensorfleet_inferenceservice_desired_replicas{" not in m.text, what="its series removed")
    finally:
        process.terminate()
        process.wait(timeout=60)
        cluster.close()
    log.seek(0)
    lines = [line for line in log.read().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any(r.get("message", "").startswith("Activity 'startup' succeeded") for r in records)
    assert all("level" in r or "severity" in r for r in records)


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def _run(*args: str, env: dict[str, str | None] | None = None) -> tuple[int, str]:
    """``tensorfleet run ARGS`` in this process, outside a pod and with no kubeconfig named unless ``env``
    says so: its exit code and output, failing on a traceback."""
    env = {"TENSORFLEET_CLUSTER": None, "TENSORFLEET_KUBECONFIG": None, "KUBECONFIG": None,
           "KUBERNETES_SERVICE_HOST": None, **(env or {})}
    result = CliRunner().invoke(main, ["run", *QUIET, *args], env=env)
    assert isinstance(result.exception, SystemExit), result.exception  # anything else would be a traceback
    return result.exit_code, result.output.strip()


def test_run_refuses_a_bad_resource_unit_file_before_connecting(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ru.yaml").write_text("NVIDIA-H100-80GB-HBM3: {fp16: abc}\n")
    code, output = _run("--server", f"http://127.0.0.1:{free_port()}",
                        "--metering-ru-table-file", str(tmp_path / "ru.yaml"))
    assert code == 2
    assert output.splitlines()[-1] == (
        f"Error: TENSORFLEET_METERING_RU_TABLE_FILE: {tmp_path}/ru.yaml."
        "NVIDIA-H100-80GB-HBM3.fp16='abc': must be a number in (0, 1000]")


async def test_a_bad_resource_unit_file_stops_the_operator_at_startup(tmp_path: pathlib.Path) -> None:
    """``kopf run`` and tests start the handlers without the CLI: a permanent error stops the operator,
    where any other exception had kopf retry the startup every minute, serving nothing."""
    memo = kopf.Memo(settings=OperatorSettings(metering_ru_table_file=str(tmp_path / "missing.yaml")))
    with pytest.raises(kopf.PermanentError, match=r"^TENSORFLEET_METERING_RU_TABLE_FILE: .*No such file"):
        await controller.startup(settings=kopf.OperatorSettings(), memo=memo)


def test_run_names_an_unreachable_api_server() -> None:
    server = f"http://127.0.0.1:{free_port()}"
    code, output = _run("--server", server)
    assert code == 1
    assert output == (f"cannot reach the API server at {server}: [Errno 111] Connection refused; "
                      "check --server or the kubeconfig's cluster, and the network to it")


@pytest.mark.parametrize(("status", "advice"), [
    (401, "check the credentials (the kubeconfig's user, or the service account's token)"),
    (403, "check the operator's RBAC (its service account needs the chart's ClusterRole)"),
])
def test_run_names_refused_credentials(emulator: EmulatorThread, status: int, advice: str) -> None:
    emulator.server.inject_fault("GET", r"/apis/tensorfleet.io/v1alpha1$", status, times=1)
    code, output = _run("--server", emulator.url)
    assert code == 1
    assert output.startswith(f"{status} ")
    assert output.endswith(f" reading /apis/tensorfleet.io/v1alpha1 from the API server at {emulator.url}: {advice}")
    assert "\n" not in output


def test_run_names_an_unusable_kubeconfig(tmp_path: pathlib.Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n"
                          "current-context: ''\n")
    code, output = _run("--kubeconfig", str(kubeconfig), "--context", "prod")
    assert code == 1
    assert output.startswith(f"Error: --kubeconfig {kubeconfig} --context prod: ")
    assert "prod" in output.removeprefix(f"Error: --kubeconfig {kubeconfig} --context prod: ")


def _kubeconfig(path: pathlib.Path, server: str) -> pathlib.Path:
    path.write_text(f"apiVersion: v1\nkind: Config\ncurrent-context: c\nusers: [{{name: u, user: {{token: t}}}}]\n"
                    f"clusters: [{{name: c, cluster: {{server: '{server}'}}}}]\n"
                    "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    return path


@pytest.mark.parametrize(("flag", "env", "named"), [
    (True, {}, "--kubeconfig {path}"),
    (False, {"TENSORFLEET_KUBECONFIG": "{path}"}, "--kubeconfig {path}"),
    (False, {"KUBECONFIG": "{path}"}, "KUBECONFIG={path}"),
], ids=["flag", "TENSORFLEET_KUBECONFIG", "KUBECONFIG"])
def test_run_refuses_a_named_kubeconfig_that_does_not_exist(tmp_path: pathlib.Path, flag: bool,
                                                            env: dict[str, str], named: str) -> None:
    """A mistyped path is an error, never the quickstart's emulator (which would look like a converged cluster)."""
    path = str(tmp_path / "typo.yaml")
    args = ["--kubeconfig", path] if flag else []
    code, output = _run(*args, "--demo-timeout-seconds", "5", env={k: v.format(path=path) for k, v in env.items()})
    assert (code, output) == (1, f"Error: {named.format(path=path)}: no such file")


@pytest.mark.parametrize("flag", ["--metrics-port", "--liveness-port"])
def test_run_names_a_busy_port(emulator: EmulatorThread, flag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, output = _run("--server", emulator.url, flag, str(port))
    assert (code, output) == (1, f"Error: {flag}={port}: cannot listen on it: Address already in use; "
                                 "choose a free port or 0 to disable it")


def test_run_cluster_incluster_uses_only_the_service_account(tmp_path: pathlib.Path) -> None:
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{free_port()}")
    code, output = _run("--cluster", "incluster", env={"KUBECONFIG": str(kubeconfig)})
    assert (code, output) == (1, "Error: --cluster=incluster: not in a pod (KUBERNETES_SERVICE_HOST is not set)")


def test_run_cluster_kubeconfig_in_a_pod_uses_only_the_kubeconfig(tmp_path: pathlib.Path) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", server)
    code, output = _run("--cluster", "kubeconfig",
                        env={"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert code == 1
    assert output.startswith(f"cannot reach the API server at {server}: ")  # not the pod's service account


@pytest.mark.parametrize("text", ["hello\n", "[]\n", "apiVersion: v1\nkind: Config\nclusters: 5\n",
                                  "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
                                  "users: [{name: u, user: {token: t}}]\n"
                                  "clusters: [{name: c, cluster: {server: 'https://k', "
                                  "certificate-authority-data: 'not base64!'}}]\n"
                                  "contexts: [{name: c, context: {cluster: c, user: u}}]\n"],
                         ids=["scalar", "list", "clusters-not-a-list", "bad-base64"])
def test_run_names_a_malformed_kubeconfig(tmp_path: pathlib.Path, text: str) -> None:
    """The kubernetes client indexes the YAML without checking its shape: a TypeError traceback, until now."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(text)
    code, output = _run("--kubeconfig", str(kubeconfig))
    assert code == 1
    assert output.startswith(f"Error: --kubeconfig {kubeconfig}: ")
    assert "\n" not in output


def test_run_with_a_context_never_falls_back_to_the_emulator(tmp_path: pathlib.Path) -> None:
    """``--context prod`` names a cluster: with no kubeconfig that is an error, never the quickstart."""
    code, output = _run("--context", "prod", "--demo-timeout-seconds", "5", env={"HOME": str(tmp_path)})
    assert (code, output) == (1, f"Error: --context prod: the default kubeconfig {tmp_path}/.kube/config: "
                                 "no such file")


def test_run_with_a_context_in_a_pod_uses_the_kubeconfig(tmp_path: pathlib.Path) -> None:
    """In a pod, ``--context`` asks for a kubeconfig as ``--kubeconfig`` does, not the service account."""
    server = f"http://127.0.0.1:{free_port()}"
    kubeconfig = _kubeconfig(tmp_path / "kubeconfig", server)
    code, output = _run("--context", "c", env={"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert code == 1
    assert output.startswith(f"cannot reach the API server at {server}: ")


def test_run_refuses_a_context_with_the_service_account(tmp_path: pathlib.Path) -> None:
    code, output = _run("--cluster", "incluster", "--context", "prod", env={"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    assert code == 1
    assert output.startswith("Error: --context prod: --cluster=incluster uses the pod's service account")
