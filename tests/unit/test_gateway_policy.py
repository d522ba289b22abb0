"""Token budgets, the response cache, tenant auth, configuration parsing and metric labels (no sockets)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from builders import inference_service
from gateway_support import gateway_document, write_document
from tensorfleet import cli, telemetry
from tensorfleet.api.types import InferenceService
from tensorfleet.config import from_env
from tensorfleet.gateway import auth
from tensorfleet.gateway import config as gwconfig
from tensorfleet.gateway.auth import TENANT_NAME, AuthError, KeyStore, TenantResolver
from tensorfleet.gateway.cache import ResponseCache, cache_key, is_deterministic
from tensorfleet.gateway.engine import TritonEngine, VLLMEngine
from tensorfleet.gateway.errors import GatewayError
from tensorfleet.gateway.hooks import ProxyRequest
from tensorfleet.gateway.metrics import GatewayMetrics
from tensorfleet.gateway.ratelimit import RateLimited, TokenRateLimiter
from tensorfleet.gateway.settings import GatewaySettings
from tensorfleet.gateway.state import Admission, GatewayState
from tensorfleet.gateway.warmup import EngineMonitor, Health, scrape_sum
from tensorfleet.metering.metrics import TenantLabels
from tensorfleet.render.context import RenderContext
from tensorfleet.render.workload import render_deployment


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_budget_reserves_then_settles_and_debt_delays() -> None:
    clock = Clock()
    limiter = TokenRateLimiter(lambda tenant: 600 if tenant == "a" else None, clock)
    assert limiter.reserve("b", 10**9) is None  # unlimited tenant
    first = limiter.reserve("a", 500)
    with pytest.raises(RateLimited) as refused:
        limiter.reserve("a", 200)
    assert refused.value.retry_after == 10  # 100 missing at 10 tokens/s
    limiter.settle(first, 100)  # used 100 of 500: 400 come back
    assert limiter.available("a") == 500
    second = limiter.reserve("a", 100)
    limiter.settle(second, 700)  # a long generation overran its reservation: debt
    assert limiter.available("a") == -200
    clock.now = 30  # 300 tokens refilled
    assert limiter.available("a") == 100


def test_a_reservation_never_exceeds_one_minutes_budget() -> None:
    limiter = TokenRateLimiter(lambda tenant: 100, Clock())
    reservation = limiter.reserve("a", 5000)
    assert reservation is not None
    assert reservation.tokens == 100


def test_cache_bounds_ttl_entries_and_bytes() -> None:
    clock = Clock()
    cache = ResponseCache(gwconfig.CacheConfig(True, ttl_seconds=10, max_entries=2, max_bytes=2000), clock)
    for key in ("a", "b", "c"):
        assert cache.put(key, 200, "application/json", (b"x" * 100,), 1, 1)
    assert cache.get("a") is None  # evicted: at most 2 entries
    assert cache.get("b") is not None
    assert not cache.put("big", 200, "application/json", (b"x" * 5000,), 1, 1)  # larger than the cache
    clock.now = 11
    assert cache.get("b") is None  # expired
    assert cache.bytes <= 2000


@pytest.mark.parametrize(("body", "cacheable"), [
    ({"temperature": 0}, True), ({"temperature": 0.0, "n": 1}, True), ({}, False), ({"temperature": 0.2}, False),
    ({"temperature": 0, "n": 2}, False), ({"temperature": False}, False), ({"temperature": 0, "logprobs": 5}, False)])
def test_only_deterministic_requests_are_cacheable(body: dict[str, Any], cacheable: bool) -> None:
    assert is_deterministic(body) is cacheable


def test_cache_keys_ignore_key_order_but_not_values() -> None:
    assert cache_key("a", "/v1/completions", {"a": 1, "b": 2}) == cache_key("a", "/v1/completions", {"b": 2, "a": 1})
    assert cache_key("a", "/v1/completions", {"a": 1}) != cache_key("a", "/v1/chat/completions", {"a": 1})
    assert cache_key("a", "/v1/completions", {"a": 1}) != cache_key("b", "/v1/completions", {"a": 1})


SECRET_A_SHA = hashlib.sha256(b"secret-a").hexdigest()


def keys(folder: pathlib.Path, **tenants: str) -> KeyStore:
    folder.mkdir(exist_ok=True)
    for tenant, key in tenants.items():
        (folder / tenant).write_text(f"sha256:{hashlib.sha256(key.encode()).hexdigest()}\n")
    (folder / "..data").mkdir(exist_ok=True)  # the kubelet's own entries are skipped
    store = KeyStore(str(folder))
    store.reload()
    return store


def test_hashed_keys_identify_tenants_and_reload(tmp_path: pathlib.Path) -> None:
    store = keys(tmp_path / "k", alpha="secret-a")
    auth = gwconfig.AuthConfig(api_keys=True)
    resolver = TenantResolver(auth, store)
    assert resolver.resolve("Bearer secret-a", None, "10.1.2.3") == "alpha"
    with pytest.raises(AuthError):
        resolver.resolve("Bearer secret-b", None, "10.1.2.3")
    with pytest.raises(AuthError):
        resolver.resolve("Basic secret-a", None, "10.1.2.3")
    (tmp_path / "k" / "beta").write_text("not a hash")
    assert store.reload()
    assert [p.file for p in store.problems] == ["beta"]
    assert not store.reload()  # unchanged


def test_a_key_listed_for_two_tenants_is_refused_for_both(tmp_path: pathlib.Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    store = keys(tmp_path / "k", alpha="secret-a", beta="secret-b")
    resolver = TenantResolver(gwconfig.AuthConfig(api_keys=True), store)
    assert resolver.resolve("Bearer secret-a", None, "10.1.2.3") == "alpha"
    (tmp_path / "k" / "zeta").write_text(hashlib.sha256(b"secret-a").hexdigest())  # pasted in by mistake
    with caplog.at_level(logging.ERROR):
        assert store.reload()
    with pytest.raises(AuthError):  # neither alpha nor zeta: which one was meant is unknown
        resolver.resolve("Bearer secret-a", None, "10.1.2.3")
    assert resolver.resolve("Bearer secret-b", None, "10.1.2.3") == "beta"
    message = ("the same API key hash is listed for tenants alpha and zeta; a key must name one tenant, so it is "
               "refused for both")
    assert [(p.file, p.message) for p in store.problems] == [("alpha", message), ("zeta", message)]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"API key Secret, key {name}: {message} (ignored)" for name in ("alpha", "zeta")]
    (tmp_path / "k" / "zeta").unlink()
    assert store.reload()
    assert not store.problems
    assert resolver.resolve("Bearer secret-a", None, "10.1.2.3") == "alpha"


@pytest.mark.parametrize("line", [f"{SECRET_A_SHA}  -", f"{SECRET_A_SHA} *-", f"sha256:{SECRET_A_SHA}",
                                  SECRET_A_SHA.upper()], ids=["sha256sum", "binary-mode", "prefixed", "upper"])
def test_a_key_hash_line_may_be_written_as_sha256sum_prints_it(tmp_path: pathlib.Path, line: str) -> None:
    """The logged hint's command printed '<hex>  -', which the same check then refused."""
    (tmp_path / "alpha").write_text(line + "\n")
    store = KeyStore(str(tmp_path))
    store.reload()
    assert store.problems == []
    assert store.tenant_for("secret-a") == "alpha"


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
def test_the_output_of_the_hinted_command_is_accepted(tmp_path: pathlib.Path) -> None:
    hinted = subprocess.run(["sh", "-c", auth.HASH_COMMAND], env={**os.environ, "KEY": "secret-a"},
                            capture_output=True, text=True, check=True).stdout
    (tmp_path / "alpha").write_text(hinted)
    store = KeyStore(str(tmp_path))
    store.reload()
    assert store.problems == []
    assert store.tenant_for("secret-a") == "alpha"


@pytest.mark.parametrize("line", [f"{SECRET_A_SHA}  key.txt", f"{SECRET_A_SHA} -x", f"{SECRET_A_SHA}-",
                                  f"{SECRET_A_SHA}  {SECRET_A_SHA}"])
def test_a_key_hash_line_with_anything_else_is_a_problem(tmp_path: pathlib.Path, line: str) -> None:
    (tmp_path / "alpha").write_text(line + "\n")
    store = KeyStore(str(tmp_path))
    store.reload()
    assert [(p.file, p.message) for p in store.problems] == [
        ("alpha", f"each line must be the hex sha256 of an API key, e.g. from: {auth.HASH_COMMAND}")]
    assert store.tenant_for("secret-a") is None


@pytest.mark.parametrize("name", [".alpha", "_alpha", "-alpha"])
def test_a_secret_key_that_is_not_a_tenant_name_is_logged_not_silently_ignored(
        tmp_path: pathlib.Path, name: str, caplog: pytest.LogCaptureFixture) -> None:
    """A key starting with '.' (Kubernetes allows '.alpha') was skipped with the kubelet's ..data: nothing logged."""
    store = keys(tmp_path / "k", beta="secret-b")
    (tmp_path / "k" / name).write_text(SECRET_A_SHA)
    with caplog.at_level(logging.ERROR):
        assert store.reload()
    message = f"the key name must be a tenant name ({auth.TENANT_NAME_RULE})"
    assert [(p.file, p.message) for p in store.problems] == [(name, message)]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"API key Secret, key {name}: {message} (ignored)"]
    assert store.tenant_for("secret-a") is None
    assert store.tenant_for("secret-b") == "beta"


def test_the_kubelets_own_entries_are_skipped(tmp_path: pathlib.Path) -> None:
    """The atomic writer's ..data link, ..<timestamp> folder and the key links into it, as mounted."""
    version = tmp_path / "..2024_01_01_00_00_00.000000001"
    version.mkdir()
    (version / "alpha").write_text(SECRET_A_SHA)
    (tmp_path / "..data").symlink_to(version.name)
    (tmp_path / "alpha").symlink_to("..data/alpha")
    store = KeyStore(str(tmp_path))
    store.reload()
    assert store.problems == []
    assert store.tenant_for("secret-a") == "alpha"


def test_the_tenant_header_counts_only_from_trusted_proxies(tmp_path: pathlib.Path) -> None:
    store = keys(tmp_path / "k", alpha="secret-a")
    config = gwconfig.parse(gateway_document(auth={"trustedTenantHeader": "X-Tenant",
                                                   "trustedProxies": ["10.0.0.0/8"]}), api_keys_mounted=True)
    resolver = TenantResolver(config.auth, store)
    assert resolver.resolve(None, "beta", "10.9.9.9") == "beta"
    assert resolver.resolve("Bearer secret-a", "beta", "192.168.1.1") == "alpha"  # header ignored
    with pytest.raises(AuthError):
        resolver.resolve(None, "beta", "192.168.1.1")


def test_without_auth_everything_goes_to_the_anonymous_tenant() -> None:
    resolver = TenantResolver(gwconfig.AuthConfig(), KeyStore(None))
    assert resolver.resolve(None, "someone", None) == "default"
    anonymous = TenantResolver(gwconfig.AuthConfig(api_keys=True, anonymous_tenant="public"), KeyStore(None))
    assert anonymous.resolve(None, None, None) == "public"


@pytest.mark.parametrize(("section", "field"), [
    ({"tokenPolicy": {"maxOutputTokens": "many"}}, "tokenPolicy.maxOutputTokens"),
    ({"tokenPolicy": {"tenants": [{"tokensPerMinute": 5}]}}, "tokenPolicy.tenants[0].name"),
    ({"tokenPolicy": {"contextStrategy": "truncate-newest"}}, "tokenPolicy.contextStrategy"),
    ({"tokenPolicy": {"runaway": {"enabled": "yes"}}}, "tokenPolicy.runaway.enabled"),
    ({"tokenPolicy": {"runaway": {"maxRepeats": 1}}}, "tokenPolicy.runaway.maxRepeats"),
    ({"tokenPolicy": {"runaway": {"windowTokens": 100000}}}, "tokenPolicy.runaway.windowTokens"),
    ({"tokenPolicy": {"runaway": {"ngramSize": 32, "windowTokens": 16}}}, "tokenPolicy.runaway.ngramSize"),
    ({"warmup": {"requests": [{"maxTokens": 3}]}}, "warmup.requests[0]"),
    ({"auth": {"trustedProxies": ["not-an-ip"]}}, "auth.trustedProxies[0]"),
    ({"model": {"servedName": None}}, "model.servedName"),
])
def test_bad_configuration_names_the_field(section: dict[str, Any], field: str) -> None:
    with pytest.raises(gwconfig.ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        gwconfig.parse(gateway_document(**section))


def test_the_operators_rendered_config_parses() -> None:
    from tensorfleet.render.gateway import gateway_config

    body = inference_service(tokenPolicy={"maxInputTokens": 100, "tenants": [{"name": "a", "tokensPerMinute": 9}]},
                             auth={"apiKeysSecretRef": {"name": "keys"}})
    body["metadata"]["uid"] = "u"
    parsed = gwconfig.parse(gateway_config(InferenceService.from_body(body)))
    assert parsed.token_policy.max_input_tokens == 100
    assert parsed.token_policy.context_strategy == "reject"
    assert parsed.token_policy.runaway == gwconfig.RunawayConfig()  # off, with the CRD's defaults
    assert parsed.token_policy.tokens_per_minute("a") == 9
    assert parsed.auth.api_keys


def test_api_key_secret_is_mounted_into_the_gateway_only() -> None:
    body = inference_service(auth={"apiKeysSecretRef": {"name": "team-keys"}})
    body["metadata"]["uid"] = "u"
    pod = render_deployment(InferenceService.from_body(body), RenderContext(), 1)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "team-keys"
    gateway, engine = (next(c for c in pod["containers"] if c["name"] == n) for n in ("gateway", "engine"))
    assert any(m["name"] == "api-keys" for m in gateway["volumeMounts"])
    assert not any(m["name"] == "api-keys" for m in engine["volumeMounts"])
    env = {e["name"]: e.get("value") for e in gateway["env"]}
    assert env["TENSORFLEET_GATEWAY_API_KEYS_DIR"] == "/var/run/secrets/tensorfleet/api-keys"


def test_settings_come_from_the_environment() -> None:
    settings = from_env(GatewaySettings, {"TENSORFLEET_GATEWAY_RUNTIME": "triton",
                                          "TENSORFLEET_GATEWAY_UPSTREAM": "http://127.0.0.1:8081",
                                          "TENSORFLEET_GATEWAY_MAX_IN_FLIGHT": "8"})
    assert settings.runtime == "triton"
    assert settings.max_in_flight == 8
    assert settings.metrics_url == "http://127.0.0.1:8083/metrics"
    assert GatewaySettings().metrics_url == "http://127.0.0.1:8081/metrics"


@pytest.mark.parametrize(("environment", "error"), [
    ({"MAX_IN_FLIGHT": "-1"}, "MAX_IN_FLIGHT=-1: must be zero or positive"),  # every request waited forever
    ({"RELOAD_SECONDS": "0"}, "RELOAD_SECONDS=0.0: must be positive, at most 86400"),  # the reload loop spun
    ({"ENGINE_POLL_SECONDS": "nan"}, "ENGINE_POLL_SECONDS=nan: must be positive, at most 86400"),
    ({"MAX_BODY_BYTES": "-1"}, "MAX_BODY_BYTES=-1: must be at least 1"),  # every body got 413
    ({"PORT": "70000"}, "PORT=70000: must be between 0 and 65535"),  # listened on 70000 mod 65536
    ({"ADMIN_PORT": "-5"}, "ADMIN_PORT=-5: must be between 0 and 65535"),  # a socket.gaierror traceback
    ({"PORT": "8000", "ADMIN_PORT": "8000"},  # an OSError traceback once the admin server listened
     "ADMIN_PORT=8000: must be different from TENSORFLEET_GATEWAY_PORT=8000"),
    ({"DRAIN_TIMEOUT_SECONDS": "-1"}, "DRAIN_TIMEOUT_SECONDS=-1.0: must be between 0 and 86400"),
    ({"UPSTREAM": "https://engine:8081"}, "UPSTREAM='https://engine:8081': must be an http://HOST[:PORT] URL"),
    ({"RUNTIME": "triton", "UPSTREAM": "http://127.0.0.1"},  # a traceback from metrics_url
     "UPSTREAM='http://127.0.0.1': must be http://HOST:PORT with a port of at most 65533 for triton"),
])
def test_the_command_names_a_setting_out_of_range(tmp_path: pathlib.Path, environment: dict[str, str],
                                                  error: str) -> None:
    config = write_document(tmp_path, gateway_document())
    result = CliRunner().invoke(cli.main, ["gateway", "--config", config],
                                env={f"TENSORFLEET_GATEWAY_{name}": value for name, value in environment.items()})
    assert result.exit_code == 2
    assert f"Error: TENSORFLEET_GATEWAY_{error}" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_the_command_names_a_metering_setting_out_of_range(tmp_path: pathlib.Path) -> None:
    config = write_document(tmp_path, gateway_document())
    result = CliRunner().invoke(cli.main, ["gateway", "--config", config, "--usage-dir", str(tmp_path)],
                                env={"TENSORFLEET_METERING_SAMPLE_PERIOD_MS": "5"})  # was a ValueError traceback
    assert result.exit_code == 1
    assert "Error: TENSORFLEET_METERING_SAMPLE_PERIOD_MS=5.0: must be between 10 and 10000" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_default_settings_are_in_range_and_triton_metrics_follow_the_upstream() -> None:
    assert GatewaySettings().validate() == []
    triton = GatewaySettings(runtime="triton", upstream="http://[fd00::7]:8000/")
    assert triton.validate() == []
    assert triton.metrics_url == "http://[fd00::7]:8002/metrics"
    assert GatewaySettings(runtime="triton", upstream="http://h", engine_metrics_url="http://h:9/m").validate() == []


def test_the_command_explains_a_missing_metering_module(tmp_path: pathlib.Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorfleet.metering.sink", None)  # as in a build without it
    config = write_document(tmp_path, gateway_document())
    result = CliRunner().invoke(cli.main, ["gateway", "--config", config])
    assert result.exit_code == 1
    assert "tensorfleet.metering.sink" in result.output


def test_the_command_names_a_bad_configuration_field(tmp_path: pathlib.Path) -> None:
    config = write_document(tmp_path, gateway_document(tokenPolicy={"maxOutputTokens": 0}))
    result = CliRunner().invoke(cli.main, ["gateway", "--config", config])
    assert result.exit_code == 1
    assert "tokenPolicy.maxOutputTokens: must be at least 1" in result.output


def test_the_revision_file_takes_precedence_over_gateway_json(tmp_path: pathlib.Path) -> None:
    """The operator splits the configuration (policy in gateway.json, engine facts in the revision file); a
    single gateway.json still works alone, and where both have revision-bound sections the revision file's win."""
    config = write_document(tmp_path, gateway_document("from-config", tokenPolicy={"maxOutputTokens": 7}))
    revision = tmp_path / "gateway-revision.json"
    revision.write_text(json.dumps({**gwconfig.revision_part(gateway_document("from-revision")),
                                    "tokenPolicy": {"maxOutputTokens": 9}}))  # policy here is not read
    assert gwconfig.load(config).served_model == "from-config"
    both = gwconfig.load(config, revision_path=str(revision))
    assert (both.served_model, both.token_policy.max_output_tokens) == ("from-revision", 7)
    assert gwconfig.read_configuration(config, str(revision)) == {
        **gateway_document("from-revision"), "tokenPolicy": gateway_document(tokenPolicy={"maxOutputTokens": 7})[
            "tokenPolicy"]}


def test_the_command_names_a_bad_field_of_the_revision_file(tmp_path: pathlib.Path) -> None:
    config = write_document(tmp_path, gwconfig.policy_part(gateway_document()))
    revision = tmp_path / "gateway-revision.json"
    revision.write_text(json.dumps(gwconfig.revision_part(gateway_document(""))))
    result = CliRunner().invoke(cli.main, ["gateway", "--config", config],
                                env={"TENSORFLEET_GATEWAY_REVISION_CONFIG": str(revision)})
    assert result.exit_code == 1
    assert f"Error: {revision}: model.servedName: required" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_tenant_labels_are_capped() -> None:
    metrics = GatewayMetrics(max_tenant_labels=2)
    assert [metrics.tenant_label(t) for t in ("a", "b", "c", "a")] == ["a", "b", telemetry.OTHER_TENANT, "a"]


@pytest.mark.parametrize("label", [GatewayMetrics(max_tenant_labels=1).tenant_label, TenantLabels(1)],
                         ids=["gateway", "metering"])
def test_no_tenant_shares_its_label_with_the_tenants_over_the_cap(label: Callable[[str], str]) -> None:
    """The overflow value was 'other', a valid tenant name: the tenant 'other' was summed with those over the cap
    in the per-tenant tokens, GPU-ms and RU. The overflow value is one that no tenant name can be."""
    assert not TENANT_NAME.match(telemetry.OTHER_TENANT)
    assert TENANT_NAME.match("other")
    assert [label(t) for t in ("other", "b", "c", "other")] == [
        "other", telemetry.OTHER_TENANT, telemetry.OTHER_TENANT, "other"]
    assert telemetry.OTHER_TENANT != "other"


def test_engine_metrics_are_read_without_a_full_parse() -> None:
    text = ('# HELP vllm:num_requests_waiting x\nvllm:num_requests_waiting{engine="0"} 2.0\n'
            'vllm:num_requests_waiting{engine="1"} 3.0\nvllm:num_requests_waiting_by_reason{r="x"} 9.0\n'
            'nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="used",model="m"} 5\n')
    assert scrape_sum(text, "vllm:num_requests_waiting") == 5.0
    assert scrape_sum(text, "nv_trt_llm_kv_cache_block_metrics", 'kv_cache_block_type="used"') == 5.0
    assert scrape_sum(text, "vllm:kv_cache_usage_perc") is None


def test_the_engine_is_gone_after_a_refused_connection_or_failed_checks_in_a_row() -> None:
    state = GatewayState(GatewayMetrics())
    monitor = EngineMonitor(VLLMEngine("tiny"), None, state, state.metrics, "", 1.0, lost_after=3)  # type: ignore[arg-type]
    state.set_engine_up(True)
    state.mark_warm()
    for health in (Health.FAILING, Health.FAILING, Health.OK, Health.FAILING, Health.FAILING):  # a slow /health
        monitor.observe(health)
    assert (state.serving, state.ready) == (True, False)  # down for now: not ready, but no new warm-up
    monitor.observe(Health.OK)
    assert state.ready
    for _ in range(3):
        monitor.observe(Health.FAILING)
    assert (state.serving, state.engine_up, state.phase) == (False, False, "waiting_for_engine")
    state.set_engine_up(True)
    state.mark_warm()  # the next engine process passed its warm-up
    monitor.observe(Health.GONE)  # nothing listens: gone at once
    assert not state.serving
    assert asyncio.run(asyncio.wait_for(monitor.engine_lost(), 1)) > 0
    state.start_drain()
    state.mark_warm()  # warmed up again while draining: still draining
    assert (state.phase, state.serving, state.ready) == ("draining", True, False)


def test_an_engine_start_is_exported_from_its_beginning_until_warm() -> None:
    state = GatewayState(GatewayMetrics())

    def began() -> float | None:
        return state.metrics.registry.get_sample_value("tensorfleet_gateway_engine_start_timestamp_seconds")

    state.begin_start(1_700_000_000.0)  # the container's start
    assert began() == 1_700_000_000.0
    state.set_engine_up(True)
    state.mark_warm()
    assert began() == 0  # warm: no start in progress, whatever the pod's age
    state.lose_engine()
    state.begin_start(1_700_003_600.0)  # the next engine process's start: when the old one was seen gone
    assert began() == 1_700_003_600.0


def test_admission_hands_slots_over_in_order() -> None:
    async def scenario() -> list[str]:
        admission = Admission(GatewayMetrics(), max_in_flight=1, max_queue=1)
        order: list[str] = []
        await admission.acquire()

        async def waiter(name: str) -> None:
            await admission.acquire()
            order.append(name)
            admission.release()

        task = asyncio.create_task(waiter("queued"))
        await asyncio.sleep(0)
        with pytest.raises(Exception, match="queue is full"):
            await admission.acquire()
        admission.release()
        await task
        assert admission.in_flight == 0
        return order

    assert asyncio.run(scenario()) == ["queued"]


def _proxied(raw: bytes, streaming: bool = False, endpoint: str = "/v1/completions") -> ProxyRequest:
    return ProxyRequest(request_id="r", endpoint=endpoint, tenant="t", body=json.loads(raw), raw=raw,
                        streaming=streaming, received=0.0, received_at=0.0, billable=True)


def test_fields_the_client_did_not_send_are_appended_to_its_own_bytes() -> None:
    raw = b'{ "model": "tiny", "prompt": "caf\\u00e9 \xc3\xa9", "stream": true }\n'
    proxied = _proxied(raw, streaming=True)
    engine = VLLMEngine("tiny")
    assert engine.clamp_output(proxied, 64) == 16  # vLLM's own default on completions, within the ceiling
    engine.prepare_upstream(proxied)
    sent = proxied.upstream_bytes()
    assert sent.startswith(raw.rstrip()[:-1])  # the client's bytes, unchanged, then the new fields
    assert json.loads(sent) == {**json.loads(raw), "max_tokens": 16,
                                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    assert not proxied.modified


@pytest.mark.parametrize(("raw", "max_tokens"), [
    (b'{"model":"tiny","prompt":"x","max_tokens":9999}', 64),  # a field the client sent changes
    ('{"model":"tiny","prompt":"x"}'.encode("utf-16"), 16),  # bytes that are not UTF-8 JSON text
])
def test_changed_fields_or_other_encodings_send_the_body_encoded_again(raw: bytes, max_tokens: int) -> None:
    proxied = _proxied(raw)
    VLLMEngine("tiny").clamp_output(proxied, 64)
    assert proxied.modified
    assert json.loads(proxied.upstream_bytes()) == {"model": "tiny", "prompt": "x", "max_tokens": max_tokens}


@pytest.mark.parametrize(("endpoint", "fields", "effective", "client_max", "sent"), [
    # chat: vLLM generates max_completion_tokens when it is set, whatever max_tokens says; both are clamped
    ("/v1/chat/completions", {"max_tokens": 1, "max_completion_tokens": 60}, 60, 60, {}),
    ("/v1/chat/completions", {"max_tokens": 100, "max_completion_tokens": 5}, 5, 5, {"max_tokens": 64}),
    ("/v1/chat/completions", {"max_tokens": None, "max_completion_tokens": 100}, 64, 64,
     {"max_completion_tokens": 64}),
    ("/v1/chat/completions", {"max_tokens": 7}, 7, 7, {}),
    ("/v1/chat/completions", {}, 64, None, {"max_tokens": 64}),
    # completions: vLLM's CompletionRequest ignores max_completion_tokens and reads max_tokens only, 16 when unset
    # (before, the gateway set the ceiling: up to 256x the output the client would get from vLLM)
    ("/v1/completions", {"max_completion_tokens": 4}, 16, None, {"max_tokens": 16}),
    ("/v1/completions", {"max_tokens": None, "max_completion_tokens": 4}, 16, None, {"max_tokens": 16}),
    ("/v1/completions", {}, 16, None, {"max_tokens": 16}),
    ("/v1/completions", {"max_tokens": 3, "max_completion_tokens": 100}, 3, 3, {}),
])
def test_the_output_bound_is_the_field_vllm_honours(endpoint: str, fields: dict[str, Any], effective: int,
                                                     client_max: int | None, sent: dict[str, Any]) -> None:
    body = {"model": "tiny", **fields}
    proxied = _proxied(json.dumps(body).encode(), endpoint=endpoint)
    assert VLLMEngine("tiny").clamp_output(proxied, 64) == effective
    assert proxied.client_max_tokens == client_max
    assert json.loads(proxied.upstream_bytes()) == {**body, **sent}


def test_a_ceiling_under_vllms_default_bounds_completions_without_a_limit() -> None:
    proxied = _proxied(b'{"model":"tiny","prompt":"x"}')
    assert VLLMEngine("tiny").clamp_output(proxied, 7) == 7
    assert json.loads(proxied.upstream_bytes())["max_tokens"] == 7


TRITON_GENERATE = "/v2/models/tiny/generate"


@pytest.mark.parametrize(("body", "effective", "sent"), [
    ({"text_input": "a", "max_tokens": 99}, 64, {"text_input": "a", "max_tokens": 64}),
    ({"text_input": "a", "parameters": {"max_tokens": 99, "top_k": 1}}, 64,
     {"text_input": "a", "parameters": {"max_tokens": 64, "top_k": 1}}),  # where the client put it
    ({"text_input": "a", "parameters": {"max_tokens": 7}}, 7, {"text_input": "a", "parameters": {"max_tokens": 7}}),
    ({"parameters": {"text_input": "a"}}, 64, {"parameters": {"text_input": "a"}, "max_tokens": 64}),
])
def test_triton_max_tokens_is_clamped_where_the_client_set_it(body: dict[str, Any], effective: int,
                                                               sent: dict[str, Any]) -> None:
    proxied = _proxied(json.dumps(body).encode(), endpoint=TRITON_GENERATE)
    engine = TritonEngine("tiny")
    engine.validate(proxied, "tiny")
    assert engine.clamp_output(proxied, 64) == effective
    assert json.loads(proxied.upstream_bytes()) == sent


@pytest.mark.parametrize(("body", "field", "message"), [
    ({"text_input": "a", "parameters": "max_tokens=4"}, "parameters", "'parameters' must be an object"),
    ({"text_input": "a", "parameters": None}, "parameters", "'parameters' must be an object"),
    ({"text_input": "a", "max_tokens": 4, "parameters": {"max_tokens": 4}}, "parameters.max_tokens",
     "'max_tokens' is set both at the top level and in 'parameters'"),
    ({"text_input": "a", "parameters": {"text_input": "b"}}, "parameters.text_input",
     "'text_input' is set both at the top level and in 'parameters'"),
    ({"parameters": {"text_input": ["a"]}}, "parameters.text_input", "'parameters.text_input' must be a string"),
    ({"text_input": "a", "parameters": {"max_tokens": "4"}}, "parameters.max_tokens",
     "'parameters.max_tokens' must be an integer"),
    ({"text_input": "a", "parameters": {"max_tokens": 0}}, "parameters.max_tokens",
     "'parameters.max_tokens' must be at least 1, got 0"),
])
def test_triton_inputs_are_checked_where_the_client_set_them(body: dict[str, Any], field: str,
                                                             message: str) -> None:
    proxied = _proxied(json.dumps(body).encode(), endpoint=TRITON_GENERATE)
    with pytest.raises(GatewayError) as refused:
        TritonEngine("tiny").validate(proxied, "tiny")
    assert (refused.value.status, refused.value.param) == (400, field)
    assert message in refused.value.message
