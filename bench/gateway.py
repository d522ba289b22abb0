"""Gateway benchmark: added latency and throughput against direct access and nginx, same run, same engine.

    python -m bench.gateway [--engines standin,vllm] [--seconds 1] [--rounds 3] [--levels 1,16,64,256]

Targets, each in its own process, all in front of the same engine process:
  direct          the engine itself
  gateway         `tensorfleet gateway` (the real server, uvloop) with auth off and no input limit
  nginx           Debian's nginx 1.22, one worker, upstream keepalive, proxy_buffering off
  probe-aiohttp   a bare aiohttp pass-through proxy (the stack alone, no policy)
  probe-aiohttp-lean  the same with the gateway's own engine client (tensorfleet.gateway.upstream) instead
                  of aiohttp's: what that choice is worth
  probe-lean      the gateway's own HTTP stack (tensorfleet.gateway.frontend server + the engine client)
                  with no policy: the floor under the gateway in Python
  probe-uvicorn   a bare uvicorn+httptools raw-ASGI pass-through proxy (from .venv-vllm)
  probe-granian   the same raw-ASGI proxy on granian (Rust HTTP server; `pip install granian` into .venv-vllm)
  gateway-asyncio the gateway on asyncio's default loop (stand-in only)
  gateway-tokenize the gateway with maxInputTokens set, so every request is counted by vLLM's /tokenize
  gateway-metered the gateway with the production metering sink (tensorfleet.metering.sink: journal, attribution,
                  signed ledger on a local disk, its writer thread in the gateway's process) instead of an in-memory
                  queue: the sidecar as it runs in a pod, metering's CPU included (no GPU here: timed, not NVML)
  gateway@REF     with --baseline REF: the gateway of another commit (from a git worktree), same settings;
                  and gateway-metered@REF too when gateway-metered runs
Engines: "standin" (tests/engines/standin.py, fast: isolates the proxies' own cost) and "vllm" (the real
vLLM on CPU with the tiny test Llama). The load generator is one aiohttp process. This machine has 2
shared cores that the engine, the proxy and the load generator all use: read the ratios, not the times.
Results go to bench/results/gateway.json (``--out``) and a Markdown table on stdout; besides throughput and
latency, each proxy's CPU time per request (user and system, all its threads, from /proc, including what it
does after the cell ends: the next cell starts once every target is idle). On a shared machine
run more rounds at one level for steadier medians, e.g. ``--engines standin --levels 1 --rounds 15
--out gateway-c1``. ``--targets gateway,nginx`` runs only those (and direct, and any ``--baseline``).

``--pin`` (stand-in only) puts the load generator and the engine on CPU 0 and every proxy on CPU 1: each
proxy's throughput with a core of its own, as a sidecar has beside a GPU engine in a pod, instead of the
share of two cores it wins from the engine and the load generator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import aiohttp

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from engines import processes  # noqa: E402

PYTHON = sys.executable
RESULTS = ROOT / "bench" / "results"
LOAD_CPUS, PROXY_CPUS = {0}, {1}  # --pin
PLAIN = {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 16, "ignore_eos": True}
NGINX_CONF = """
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  upstream engine {{ server 127.0.0.1:{engine_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    keepalive_requests 100000;
    location / {{
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""


def ensure_nginx() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found:
        return found
    print("installing nginx (Debian package) ...", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
    subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], check=True, env=env, capture_output=True,
                   timeout=300)
    return "/usr/sbin/nginx"


@contextlib.contextmanager
def process(command: list[str], health: str, log: pathlib.Path, env: dict[str, str] | None = None,
            seconds: float = 60, cpus: set[int] | None = None) -> Iterator[int]:
    """Runs ``command`` until the block ends (yields its pid); on ``cpus`` only (threads and forked workers
    included) if given."""
    pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))
    with open(log, "wb") as output:
        proc = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})}, cwd=ROOT, preexec_fn=pin)
    try:
        processes.wait_http(health, seconds, proc, log)  # type: ignore[arg-type]
        yield proc.pid
    finally:
        processes.stop_group(proc)  # type: ignore[arg-type]


def quiesce(pids: list[int], limit: float = 10.0) -> None:
    """Wait until the targets are idle: a metered gateway's writer goes on settling the last cell's requests
    after it, and would take CPU from the next target."""
    deadline = time.monotonic() + limit
    last = _cpu_ticks(pids)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _cpu_ticks(pids)
        if now - last <= 1:  # at most one clock tick in 100 ms
            return
        last = now


def _cpu_ticks(pids: list[int]) -> int:
    """User and system CPU clock ticks of these processes and their children (nginx's worker), all threads."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
            children = [int(c) for task in pathlib.Path(f"/proc/{pid}/task").iterdir()
                        for c in (task / "children").read_text().split()]
            total += _cpu_ticks(children)
    return total


def gateway_config(folder: pathlib.Path, name: str, max_input: int | None) -> str:
    policy: dict[str, Any] = {"maxOutputTokens": 4096}
    if max_input:
        policy["maxInputTokens"] = max_input
    doc = {"service": {"namespace": "bench", "name": "bench"}, "model": {"servedName": "tiny"}, "runtime": "vllm",
           "warmup": {"requests": [{"prompt": "warm up", "maxTokens": 2}]}, "tokenPolicy": policy, "auth": {},
           "billing": {"tier": "standard"}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def tree_env(tree: pathlib.Path) -> dict[str, str]:
    """The environment that makes a Python process import tensorfleet (and tests' helpers) from ``tree``."""
    return {"PYTHONPATH": f"{tree / 'operator'}{os.pathsep}{tree}"}


@contextlib.contextmanager
def worktree(ref: str, tree: pathlib.Path) -> Iterator[pathlib.Path]:
    """A checkout of ``ref`` at ``tree`` (without the optional C extension, which only the runaway check uses)."""
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), ref], cwd=ROOT, check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


@contextlib.contextmanager
def proxies(engine: str, work: pathlib.Path, names: list[str],
            cpus: set[int] | None = None, pids: dict[str, int] | None = None) -> Iterator[dict[str, str]]:
    urls = {"direct": engine}
    engine_port = int(engine.rsplit(":", 1)[1])
    with contextlib.ExitStack() as stack:
        for name in names:
            port = processes.free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            health = urls[name] + "/v1/models"
            env: dict[str, str] = {}
            if name.startswith("gateway"):
                admin = processes.free_port()
                config = gateway_config(work, name.replace("@", "-"), 512 if name == "gateway-tokenize" else None)
                loop = "asyncio" if name == "gateway-asyncio" else "uvloop"
                command = [PYTHON, "-m", "bench._run_gateway", "--config", config, "--upstream", engine,
                           "--port", str(port), "--admin-port", str(admin), "--loop", loop]
                if name.partition("@")[0] == "gateway-metered":
                    command += ["--usage-dir", str(work / f"usage-{port}")]
                health = f"http://127.0.0.1:{admin}/readyz"
                if "@" in name:  # the gateway of another commit, from a worktree of it
                    tree = stack.enter_context(worktree(name.partition("@")[2], work / f"tree-{port}"))
                    env = tree_env(tree)
            elif name == "nginx":
                prefix = work / f"nginx-{port}"
                prefix.mkdir()
                conf = prefix / "nginx.conf"
                conf.write_text(NGINX_CONF.format(prefix=prefix, engine_port=engine_port, port=port))
                command = [ensure_nginx(), "-c", str(conf), "-p", str(prefix)]
            elif name in ("probe-aiohttp", "probe-aiohttp-lean", "probe-lean"):
                probe = name.removeprefix("probe-")
                command = [PYTHON, str(ROOT / "bench" / "_stack_probe.py"), probe, engine, str(port)]
            else:
                command = [str(processes.VLLM_PYTHON), str(ROOT / "bench" / "_stack_probe.py"), name.split("-")[1],
                           engine, str(port)]
            if name.startswith("probe") or name == "nginx":
                health = engine + "/health"
            pid = stack.enter_context(process(command, health, work / f"{name}.log", env, cpus=cpus))
            if pids is not None:
                pids[name] = pid
            if name.startswith("probe") or name == "nginx":
                time.sleep(1.0)  # these have no readiness endpoint of their own
        yield urls


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], stream: bool) -> tuple[float, float]:
    """(latency, time to first byte) of one request."""
    started = time.perf_counter()
    first = 0.0
    async with session.post(url, json={**body, "stream": stream}) as response:
        async for _ in response.content.iter_any():
            if not first:
                first = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{url}: status {response.status}")
    return time.perf_counter() - started, first


async def load(url: str, concurrency: int, seconds: float, stream: bool) -> dict[str, float]:
    target = url + "/v1/completions"
    latencies: list[float] = []
    firsts: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(min(concurrency, 32)):  # warm the connection pools
            await one(session, target, PLAIN, stream)
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                latency, first = await one(session, target, PLAIN, stream)
                latencies.append(latency)
                firsts.append(first)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
            "ttfb_p50_ms": 1000 * statistics.median(firsts)}


async def chunk_delays(url: str, concurrency: int, streams: int) -> list[float]:
    """Per streamed chunk: arrival time minus the stand-in's send stamp (ms)."""
    delays: list[float] = []
    body = {**PLAIN, "max_tokens": 40, "stream": True}

    async def one_stream(session: aiohttp.ClientSession) -> None:
        async with session.post(url + "/v1/completions", json=body) as response:
            buffer = b""
            async for data in response.content.iter_any():
                now = time.time_ns()
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    if b'"sent_ns":' in event:
                        sent = int(event.split(b'"sent_ns":')[1].split(b"}")[0].split(b",")[0])
                        delays.append((now - sent) / 1e6)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        for _ in range(streams // concurrency):
            await asyncio.gather(*(one_stream(session) for _ in range(concurrency)))
    return delays


def summarize_delays(delays: list[float]) -> dict[str, float]:
    delays.sort()
    return {"chunks": len(delays), "p50_ms": statistics.median(delays), "p99_ms": delays[int(0.99 * (len(delays) - 1))]}


def run_engine(name: str, engine_url: str, work: pathlib.Path, args: argparse.Namespace) -> dict[str, Any]:
    names = ["gateway", "gateway-metered", "nginx"]
    if name == "standin":
        names += ["gateway-asyncio", "probe-aiohttp", "probe-aiohttp-lean", "probe-lean"]
        names += [f"probe-{stack}" for stack in ("uvicorn", "granian") if _importable(stack)]
    else:
        names += ["gateway-tokenize"]
    names += [f"gateway@{ref}" for ref in args.baseline]
    if args.targets:
        names = [n for n in names if n in args.targets.split(",") or n.startswith("gateway@")]
    if "gateway-metered" in names:
        names += [f"gateway-metered@{ref}" for ref in args.baseline]
    levels = [int(v) for v in args.levels.split(",")]
    if name == "vllm":
        levels = [lv for lv in levels if lv <= 64]  # 2 engine slots on CPU: deeper queues only measure the queue
    rounds: dict[str, list[dict[str, float]]] = {}
    pids: dict[str, int] = {}
    with proxies(engine_url, work, names, PROXY_CPUS if args.pin else None, pids) as urls:
        # Targets interleaved within each round, so that a slow spell of the shared machine hits all of
        # them; the table reads the median over rounds of each target's difference to direct in that round.
        for index in range(args.rounds):
            for stream in (False, True):
                for level in levels:
                    for target, url in urls.items():
                        if target == "gateway-tokenize" and level > 16:
                            continue
                        key = f"{'stream' if stream else 'plain'}/c{level}/{target}"
                        ticks = _cpu_ticks([pids[target]]) if target in pids else 0
                        cell = asyncio.run(load(url, level, args.seconds, stream))
                        quiesce(list(pids.values()))
                        if target in pids:  # what serving the cell took, work left behind included
                            spent = (_cpu_ticks([pids[target]]) - ticks) / os.sysconf("SC_CLK_TCK")
                            cell["cpu_us_per_request"] = spent / max(1, cell["requests"]) * 1e6
                        rounds.setdefault(key, []).append(cell)
                        print(f"{name} round {index + 1} {key}: {cell}", file=sys.stderr)
    return {key: {"rounds": cells, **{metric: statistics.median(c[metric] for c in cells) for metric in cells[0]}}
            for key, cells in rounds.items()}


def _importable(module: str) -> bool:
    """Whether .venv-vllm (which has uvicorn and httptools) can run the probe for this stack."""
    if not processes.VLLM_PYTHON.exists():
        return False
    return subprocess.run([str(processes.VLLM_PYTHON), "-c", f"import {module}"], capture_output=True).returncode == 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} cores (shared)", "seconds_per_cell": args.seconds,
                               "rounds": args.rounds, "pinned": args.pin}
    engine_cpus = None
    if args.pin:  # the load generator and the engine on one core, each proxy on the other
        os.sched_setaffinity(0, LOAD_CPUS)
        engine_cpus = LOAD_CPUS
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        work = pathlib.Path(tmp)
        if "standin" in args.engines:
            port = processes.free_port()
            url = f"http://127.0.0.1:{port}"
            command = [PYTHON, "-m", "tests.engines.standin", "--port", str(port)]
            with process(command, url + "/health", work / "standin.log", cpus=engine_cpus):
                results["standin"] = run_engine("standin", url, work, args)
            if args.pin:
                return results  # chunk delivery and vLLM are measured on shared cores only
            port = processes.free_port()
            url = f"http://127.0.0.1:{port}"
            command = [PYTHON, "-m", "tests.engines.standin", "--port", str(port), "--token-delay", "0.005", "--stamp"]
            with process(command, url + "/health", work / "standin-stamped.log"), \
                    proxies(url, work, ["gateway", "nginx"]) as urls:
                results["chunk_delay"] = {f"c{c}/{t}": summarize_delays(asyncio.run(chunk_delays(u, c, 4 * c)))
                                          for c in (1, 16) for t, u in urls.items()}
        if "vllm" in args.engines:
            with processes.vllm_server(work) as url:
                results["vllm"] = run_engine("vllm", url, work, args)
    return results


def paired(cell: dict[str, Any], direct: dict[str, Any]) -> tuple[float, float]:
    """(throughput relative to direct, added p50 ms): medians over rounds of the same-round comparison."""
    pairs = list(zip(cell.get("rounds", [cell]), direct.get("rounds", [direct]), strict=True))
    return (statistics.median(c["rps"] / d["rps"] for c, d in pairs),
            statistics.median(c["p50_ms"] - d["p50_ms"] for c, d in pairs))


def table(results: dict[str, Any]) -> str:
    lines = []
    for engine in ("standin", "vllm"):
        cells = results.get(engine)
        if not cells:
            continue
        lines += [f"\n### {engine}\n", "| mode | conc. | target | req/s | vs direct | p50 ms | added p50 ms | p99 ms "
                  "| proxy CPU µs/request |", "|---|---|---|---|---|---|---|---|---|"]
        for key, cell in cells.items():
            mode, level, target = key.split("/")
            ratio, added = paired(cell, cells[f"{mode}/{level}/direct"])
            cpu = f"{cell['cpu_us_per_request']:.0f}" if "cpu_us_per_request" in cell else "-"
            lines.append(f"| {mode} | {level[1:]} | {target} | {cell['rps']:.0f} | {ratio:.2f} | "
                         f"{cell['p50_ms']:.2f} | {added:+.2f} | {cell['p99_ms']:.2f} | {cpu} |")
    if "chunk_delay" in results:
        lines += ["\n### streamed chunk delivery (send stamp to client arrival)\n",
                  "| cell | chunks | p50 ms | p99 ms |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['chunks']} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} |" for k, v in
                  results["chunk_delay"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="standin,vllm")
    parser.add_argument("--seconds", type=float, default=1.0, help="per cell and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the table shows medians")
    parser.add_argument("--levels", default="1,16,64,256")
    parser.add_argument("--out", default="gateway", help="results go to bench/results/OUT.json")
    parser.add_argument("--targets", default="", help="comma-separated targets to run (default: all; direct always)")
    parser.add_argument("--pin", action="store_true",
                        help="stand-in only: the load generator and the engine on CPU 0, each proxy on CPU 1 "
                             "(a proxy's own capacity, as a sidecar with its own core has it)")
    parser.add_argument("--baseline", action="append", default=[], metavar="REF",
                        help="also run the gateway of this commit (target gateway@REF), to compare changes")
    args = parser.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    results = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
