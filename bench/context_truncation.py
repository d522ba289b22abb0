"""truncate-oldest: tokenizer calls per truncated request, against simpler ways of finding what to drop.

    python -m bench.context_truncation [--cases 300] [--vllm]

Every way counts with the engine's tokenizer (a round trip each); they differ in how many counts they need
to find the fewest oldest turns to drop. Same conversations, same limits, same run:

* gateway: one count of the whole prompt, then ``fewest_turns`` (tensorfleet.gateway.context) from an
  estimate in proportion to each turn's size, galloping then bisecting;
* bisection: one count, then plain bisection over 1..turns (no estimate);
* one by one: drop a turn, count again, until it fits;
* per turn: count every turn on its own once, then add up (turns + 2 counts; sums are not exact with
  real templates, shown for scale).

Conversations: a system message, 4 to 256 earlier turns of user/assistant messages whose sizes vary
widely (10 to 600 words, log-uniform), and a last question; the limit makes a random number of turns too
many (a few cases cannot fit at all). The token counter here is a word counter shaped like a chat
template (a few tokens per message); tests/integration checks the search against vLLM's own tokenizer.
With ``--vllm`` the bench also times vLLM's ``/tokenize`` for a ~900-token chat on this machine, against
a one-token chat completion of the same messages (needs .venv-vllm). Results: bench/results/
context_truncation.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import pathlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tensorfleet.gateway.context import Conversation, fewest_turns  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TURNS = (4, 16, 64, 256)
VOCABULARY = ["engineers", "meter", "tokens", "on", "many", "gpus", "and", "gateways", "stream", "every", "chunk",
              "to", "clients"]


def count(messages: list[dict[str, Any]]) -> int:
    """Tokens as a chat template would give them: 4 per message around its words, 3 for the reply prompt."""
    return sum(4 + len(str(m["content"]).split()) for m in messages) + 3


def conversation(rng: random.Random, turns: int) -> list[dict[str, Any]]:
    def words() -> str:
        size = int(math.exp(rng.uniform(math.log(10), math.log(600))))
        return " ".join(rng.choice(VOCABULARY) for _ in range(size))

    messages = [{"role": "system", "content": words()}]
    for _ in range(turns):
        messages += [{"role": "user", "content": words()}, {"role": "assistant", "content": words()}]
    return [*messages, {"role": "user", "content": words()}]


class Counted:
    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.calls = 0

    async def without(self, turns: int) -> int:
        self.calls += 1
        return count(self.conversation.without(turns))


async def gateway_way(conv: Conversation, full: int, limit: int) -> tuple[int | None, int]:
    counter = Counted(conv)
    search = await fewest_turns(len(conv.turns), conv.estimate(full, full - limit), counter.without, limit)
    return search.turns, 1 + counter.calls


async def bisection_way(conv: Conversation, full: int, limit: int) -> tuple[int | None, int]:
    counter = Counted(conv)
    low, high = 0, len(conv.turns) + 1
    while high - low > 1:
        middle = (low + high) // 2
        if await counter.without(middle) <= limit:
            high = middle
        else:
            low = middle
    return (high if high <= len(conv.turns) else None), 1 + counter.calls


async def one_by_one_way(conv: Conversation, full: int, limit: int) -> tuple[int | None, int]:
    counter = Counted(conv)
    for turns in range(1, len(conv.turns) + 1):
        if await counter.without(turns) <= limit:
            return turns, 1 + counter.calls
    return None, 1 + counter.calls


async def per_turn_way(conv: Conversation, full: int, limit: int) -> tuple[int | None, int]:
    sizes = [count([conv.messages[i] for i in turn]) - 3 for turn in conv.turns]
    total = full
    for turns, size in enumerate(sizes, start=1):
        total -= size
        if total <= limit:
            return turns, len(sizes) + 2
    return None, len(sizes) + 2


WAYS: dict[str, Callable[[Conversation, int, int], Awaitable[tuple[int | None, int]]]] = {
    "gateway": gateway_way, "bisection": bisection_way, "one by one": one_by_one_way, "per turn": per_turn_way}


async def simulate(cases: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    results: dict[str, Any] = {}
    for turns in TURNS:
        calls: dict[str, list[int]] = {way: [] for way in WAYS}
        for _ in range(cases):
            messages = conversation(rng, turns)
            conv = Conversation.split(messages)
            full = count(messages)
            drop = rng.randint(1, turns + 1)  # turns + 1: even dropping every turn is not enough
            limit = count(conv.without(drop)) if drop <= turns else count(conv.without(turns)) - 1
            answers = {}
            for way, run in WAYS.items():
                answers[way], used = await run(conv, full, limit)
                calls[way].append(used)
            expected = drop if drop <= turns else None
            if answers["gateway"] != expected or answers["bisection"] != expected:
                raise AssertionError(f"wrong answer: {answers} for {expected}")
        results[str(turns)] = {way: {"mean": statistics.mean(values), "p95": sorted(values)[int(0.95 * len(values))],
                                     "max": max(values)} for way, values in calls.items()}
    return results


def time_vllm(repeats: int) -> dict[str, float]:
    """Median ms of vLLM's /tokenize for a ~900-token chat, and of a 1-token chat completion of it."""
    import aiohttp

    from engines import processes

    messages = conversation(random.Random(1), 8)[:9]

    async def measure(url: str) -> dict[str, float]:
        async with aiohttp.ClientSession() as session:
            async def timed(path: str, body: dict[str, Any]) -> float:
                started = time.perf_counter()
                async with session.post(url + path, json=body) as response:
                    await response.read()
                    assert response.status == 200, await response.text()
                return 1000 * (time.perf_counter() - started)

            tokenize = {"model": processes.SERVED, "messages": messages}
            generate = {**tokenize, "max_tokens": 1}
            async with session.post(url + "/tokenize", json=tokenize) as response:
                tokens = (await response.json())["count"]
            for _ in range(3):
                await timed("/tokenize", tokenize)
                await timed("/v1/chat/completions", generate)
            counts = [await timed("/tokenize", tokenize) for _ in range(repeats)]
            completions = [await timed("/v1/chat/completions", generate) for _ in range(repeats)]
            return {"prompt_tokens": tokens, "tokenize_ms": statistics.median(counts),
                    "one_token_completion_ms": statistics.median(completions)}

    with tempfile.TemporaryDirectory() as tmp, processes.vllm_server(pathlib.Path(tmp)) as url:
        return asyncio.run(measure(url))


def markdown(result: dict[str, Any]) -> str:
    ways = list(WAYS)
    lines = ["| earlier turns | " + " | ".join(f"{w}: mean / p95 / max" for w in ways) + " |",
             "|---" * (len(ways) + 1) + "|"]
    for turns, row in result["calls"].items():
        cells = [f"{row[w]['mean']:.1f} / {row[w]['p95']} / {row[w]['max']}" for w in ways]
        lines.append(f"| {turns} | " + " | ".join(cells) + " |")
    vllm = result.get("vllm")
    if vllm:
        lines.append("")
        lines.append(f"vLLM (CPU, this machine): /tokenize of a {vllm['prompt_tokens']}-token chat "
                     f"{vllm['tokenize_ms']:.1f} ms median; a one-token chat completion of the same messages "
                     f"{vllm['one_token_completion_ms']:.1f} ms.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=300, help="conversations per size")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--vllm", action="store_true", help="also time vLLM's /tokenize (starts vLLM, ~1 min)")
    args = parser.parse_args()
    result: dict[str, Any] = {"cases": args.cases, "seed": args.seed,
                              "calls": asyncio.run(simulate(args.cases, args.seed))}
    if args.vllm:
        result["vllm"] = time_vllm(30)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "context_truncation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
