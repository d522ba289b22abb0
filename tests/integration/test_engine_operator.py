"""Engines end to end: the real operator (KopfRunner) against the API emulator. The build Job's pods are
simulated (``Cluster.simulate_job_pod``): that is the Job controller's and kubelet's work, not ours."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from builders import engine, engine_spec, triton_service
from cluster import ISVC, Cluster, wait_for
from integration.test_operator import RESYNC, operator, writes_during
from tensorfleet.sandbox.apiserver import EmulatorThread

pytestmark = pytest.mark.integration
H100 = "NVIDIA-H100-80GB-HBM3"
SHA = "sha256:" + "ab" * 32


@pytest.fixture
def cluster(emulator: EmulatorThread, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    monkeypatch.setenv("TENSORFLEET_ENGINE_STORE", "s3://engines/prod")
    monkeypatch.setenv("TENSORFLEET_ENGINE_STORE_SECRET", "engine-store")
    monkeypatch.setenv("TENSORFLEET_ENGINE_RETRY_BASE_SECONDS", "3600")
    client = Cluster(emulator)
    client.add_gpu_node("gpu-h100-0", H100, 9, 0)
    yield client
    client.close()


def report(body: dict, result: str = "cache", **extra: object) -> dict:
    return {"result": result, "fingerprint": body["status"]["fingerprint"], "sha256": SHA, "sizeBytes": 4096,
            "uri": f"s3://engines/prod/{body['status']['fingerprint']}", "builtAt": "2026-11-20T10:00:00Z",
            "buildSeconds": 900.0, **extra}


def only_job(cluster: Cluster, engine_name: str) -> dict:
    return wait_for(lambda: (found := cluster.jobs(engine_name)) and len(found) == 1 and found[0],
                    what=f"one Job of {engine_name}")


def complete_build(cluster: Cluster, engine_name: str) -> None:
    """Play the Job controller and kubelet: the Engine's build Job finds its artifact in the store."""
    job = only_job(cluster, engine_name)
    body = wait_for(lambda: (e := cluster.engine(engine_name)) and e.get("status", {}).get("fingerprint") and e,
                    what="status.fingerprint")
    cluster.simulate_job_pod(job, report(body), job_status={"succeeded": 1, "conditions": [
        {"type": "Complete", "status": "True"}]})


def test_triton_builds_one_engine_per_product_then_serves_it_verified(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch) as runner:
        assert cluster.create(triton_service("llama", model={"uri": "hf://a/b@v1"}, replicas=2)).status_code == 201
        created = wait_for(lambda: cluster.engines(), what="the Engine")
        assert len(created) == 1
        name = created[0]["metadata"]["name"]
        assert created[0]["spec"]["gpu"] == {"product": H100, "computeCapability": "9.0"}
        job = only_job(cluster, name)
        assert job["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": H100}
        building = cluster.condition("llama", "EngineReady")
        assert building is not None
        assert building["status"] == "False"
        assert not [d for d in cluster.children("llama") if d["kind"] == "Deployment"]  # nothing serves yet
        body = wait_for(lambda: (e := cluster.engine(name)) and e.get("status", {}).get("fingerprint") and e,
                        what="status.fingerprint")
        cluster.simulate_job_pod(job, report(body), job_status={"succeeded": 1, "conditions": [
            {"type": "Complete", "status": "True"}]})
        wait_for(lambda: (cluster.engine_condition(name, "Ready") or {}).get("status") == "True", what="Engine Ready")
        assert cluster.engine(name)["status"]["artifact"]["source"] == "cache"
        deployment = wait_for(lambda: next((d for d in cluster.children("llama") if d["kind"] == "Deployment"), None),
                              what="the serving Deployment")
        init = deployment["spec"]["template"]["spec"]["initContainers"][0]
        assert init["name"] == "engine-fetch"
        assert SHA in init["args"]
        wait_for(lambda: cluster.jobs(name) == [], what="the finished Job cleaned up")
        cluster.mark_deployments_ready("llama")
        wait_for(lambda: (cluster.condition("llama", "Ready") or {}).get("status") == "True", what="service Ready")
        assert cluster.condition("llama", "EngineReady")["status"] == "True"
        assert cluster.isvc("llama")["status"]["engines"] == [
            {"gpuProduct": H100, "engine": name, "ready": True, "reason": "Ready"}]
        time.sleep(2 * RESYNC)
        assert writes_during(cluster, 4 * RESYNC) == []  # converged, engines and jobs included: zero writes
    assert runner.exit_code == 0


def test_a_gitops_engine_that_fails_reports_why_and_deleting_it_cancels_its_job(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        manifest = engine({**engine_spec(), "storeRef": {"pvc": {"claimName": "engines"}}})
        name = manifest["metadata"]["name"]
        assert cluster.create(manifest).status_code == 201
        job = only_job(cluster, name)
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["engine-store"]["persistentVolumeClaim"]["claimName"] == "engines"
        body = wait_for(lambda: (e := cluster.engine(name)) and e.get("status", {}).get("fingerprint") and e,
                        what="status.fingerprint")
        failure = {"result": "failed", "fingerprint": body["status"]["fingerprint"], "reason": "BuildFailed",
                   "message": "trtllm-build exited with status 1", "logTail": "[TRT] [E] out of memory"}
        cluster.simulate_job_pod(job, failure, exit_code=1, job_status={"failed": 3, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "3 pods failed"}]})
        failed = wait_for(lambda: (c := cluster.engine_condition(name, "Failed")) and c["status"] == "True" and c,
                          what="Engine Failed")
        assert failed["reason"] == "BuildFailed"
        assert cluster.engine(name)["status"]["failure"]["logTail"] == "[TRT] [E] out of memory"
        assert len(cluster.jobs(name)) == 1  # backing off: no second Job while one exists
        spec_edit = cluster.patch("tensorfleet.io/v1alpha1", "Engine", name, {"spec": {"precision": "bf16"}})
        assert spec_edit.status_code == 422
        assert "spec is immutable" in spec_edit.json()["message"]
        assert not cluster.engine(name)["metadata"].get("finalizers")  # deletable without an operator too
        cluster.delete("tensorfleet.io/v1alpha1", "Engine", name)
        wait_for(lambda: cluster.engine(name) is None, what="the Engine gone")
        wait_for(lambda: cluster.jobs(name) == [], what="its Job cancelled")


def test_a_serving_pod_that_finds_the_artifact_corrupt_triggers_a_rebuild(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        cluster.create(triton_service("llama", model={"uri": "hf://a/b@v1"}))
        name = wait_for(lambda: cluster.engines(), what="the Engine")[0]["metadata"]["name"]
        job = only_job(cluster, name)
        body = wait_for(lambda: (e := cluster.engine(name)) and e.get("status", {}).get("fingerprint") and e,
                        what="status.fingerprint")
        cluster.simulate_job_pod(job, report(body, "build"))
        deployment = wait_for(lambda: next((d for d in cluster.children("llama") if d["kind"] == "Deployment"), None),
                              what="the serving Deployment")
        cluster.simulate_corrupt_fetch(deployment, SHA, "builds/x/engine/rank0.engine: expected sha256 ..., found ...")
        rebuild = wait_for(lambda: next((j for j in cluster.jobs(name) if j["metadata"]["name"].endswith("-2")),
                                        None), what="a rebuild Job")
        engine_now = cluster.engine(name)
        assert engine_now["status"]["corruption"]["pod"].endswith("-corrupt")
        assert (cluster.engine_condition(name, "Ready") or {})["status"] == "False"
        wait_for(lambda: (cluster.condition("llama", "EngineReady") or {}).get("status") == "False",
                 what="EngineReady=False while rebuilding")
        # Pods that verified their own copy keep serving while the artifact is re-verified or rebuilt.
        assert [d for d in cluster.children("llama") if d["kind"] == "Deployment"]
        rebuilt = "sha256:" + "cd" * 32
        cluster.simulate_job_pod(rebuild, report(engine_now, "build", sha256=rebuilt))
        wait_for(lambda: any(rebuilt in d["spec"]["template"]["spec"]["initContainers"][0]["args"]
                             for d in cluster.children("llama") if d["kind"] == "Deployment"),
                 what="the rebuilt engine rolled out")
        assert cluster.engine(name)["status"]["corruption"]["resolved"] is True


def test_an_engine_change_keeps_serving_the_old_engine_until_the_new_one_is_ready(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        assert cluster.create(triton_service("llama", model={"uri": "hf://a/b@v1"}, replicas=2)).status_code == 201
        old = wait_for(lambda: cluster.engines(), what="the Engine")[0]["metadata"]["name"]
        complete_build(cluster, old)
        wait_for(lambda: [d for d in cluster.children("llama") if d["kind"] == "Deployment"], what="a Deployment")
        cluster.mark_deployments_ready("llama")
        wait_for(lambda: (cluster.condition("llama", "Ready") or {}).get("status") == "True", what="service Ready")
        serving = next(d for d in cluster.children("llama") if d["kind"] == "Deployment")

        cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"engine": {"maxBatchSize": 64}}})
        new = wait_for(lambda: [n for e in cluster.engines() if (n := e["metadata"]["name"]) != old],
                       what="the new Engine")[0]
        building = wait_for(lambda: (c := cluster.condition("llama", "Progressing")) and c["reason"] ==
                            "BuildingEngines" and c, what="Progressing=True, BuildingEngines")
        assert building["status"] == "True"
        assert f"keeps serving Engine {old}" in building["message"]
        time.sleep(2 * RESYNC)
        assert writes_during(cluster, 3 * RESYNC) == []  # a pending swap is steady too
        assert [d for d in cluster.children("llama") if d["kind"] == "Deployment"] == [serving]  # untouched
        assert cluster.engine(old) is not None
        assert cluster.condition("llama", "Ready")["status"] == "True"

        complete_build(cluster, new)
        wait_for(lambda: any(d["spec"]["template"]["metadata"]["labels"]["tensorfleet.io/engine"] == new
                             for d in cluster.children("llama") if d["kind"] == "Deployment"),
                 what="the Deployment rolled to the new Engine")
        wait_for(lambda: cluster.engine(old) is None, what="the old Engine released")


def test_switching_to_vllm_releases_the_engines_and_cancels_their_build(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with operator(emulator, monkeypatch):
        assert cluster.create(triton_service("llama", model={"uri": "hf://a/b@v1"})).status_code == 201
        name = wait_for(lambda: cluster.engines(), what="the Engine")[0]["metadata"]["name"]
        only_job(cluster, name)
        wait_for(lambda: (cluster.isvc("llama").get("status") or {}).get("engines"), what="status.engines")
        patched = cluster.patch(ISVC, "InferenceService", "llama", {"spec": {"runtime": {"name": "vllm"}}})
        assert patched.status_code == 200
        wait_for(lambda: cluster.get("apps/v1", "Deployment", "llama"), what="the vllm Deployment")
        wait_for(lambda: cluster.engine(name) is None, what="the Engine released (its last owner left)")
        wait_for(lambda: cluster.jobs(name) == [], what="its build Job cancelled")
        wait_for(lambda: "engines" not in cluster.isvc("llama")["status"], what="status.engines removed")
        assert cluster.condition("llama", "EngineReady") is None


def test_an_engine_deleted_unseen_by_the_watch_gets_no_new_job(
        emulator: EmulatorThread, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch that relists after "410 Gone" reports no deletion: the Engine's daemon ran on with its last
    body and created the deleted Engine's build Job again once the garbage collector had removed it."""
    with operator(emulator, monkeypatch):
        manifest = engine({**engine_spec(), "storeRef": {"pvc": {"claimName": "engines"}}})
        name = manifest["metadata"]["name"]
        assert cluster.create(manifest).status_code == 201
        only_job(cluster, name)
        wait_for(lambda: (cluster.engine(name) or {}).get("status", {}).get("fingerprint"), what="status")
        emulator.delete_unwatched(ISVC, "engines", "default", name)
        assert cluster.engine(name) is None
        time.sleep(2 * RESYNC)  # the Job collected (which pokes the daemon), and resyncs
        assert cluster.jobs(name) == []
        assert writes_during(cluster, 3 * RESYNC) == []
