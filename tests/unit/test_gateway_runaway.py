"""Runaway-output detection on recorded and representative texts, and how it reads engine events.

tests/data/runaway/ holds the texts: ``loop-vllm-tiny-*`` were recorded from the real vLLM serving the
tiny test Llama with greedy decoding (it loops at once, as small models do); the other ``loop-*`` files
reproduce failure modes seen in larger models (a closing sentence, a paragraph, a reasoning step, a list
item, a code line, a table row, CJK, a laugh with no spaces, newlines, punctuation and emoji floods),
each as long as a runaway would run. ``clean-*`` are texts that must pass: prose, real code from this
repository (including a test table of near-identical lines), markdown tables, JSON and Chinese prose.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorfleet.gateway import runaway, runaway_hook
from tensorfleet.gateway.config import RunawayConfig
from tensorfleet.gateway.hooks import ProxyRequest
from tensorfleet.gateway.metrics import GatewayMetrics
from tensorfleet.gateway.runaway import PUNCTUATION, REPETITION, RunawayDetector
from tensorfleet.gateway.runaway_hook import (
    CHECK_EVERY,
    SINGLE_CHOICE_SHAPES,
    EchoedPrompt,
    RunawayGuard,
    RunawayHook,
    body_texts,
    stream_texts,
)

DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "runaway"
LOOPS = sorted(p.name for p in DATA.glob("loop-*"))
CLEAN = sorted(p.name for p in DATA.glob("clean-*") if p.name != "clean-code-identity.txt")
FLOODS = {"loop-newlines.txt", "loop-punctuation.txt", "loop-emoji.txt", "loop-dots-spaces.txt"}
NO_EXTENSION = pytest.mark.skipif(runaway.native_detector_core is None,
                                  reason="the optional C extension tensorfleet.gateway._textscan was not compiled here")
# Both detectors: the C extension's (windows up to NATIVE_MAX_WINDOW, where it was compiled) and the probes.
CORES = pytest.mark.parametrize("native", [pytest.param(True, marks=NO_EXTENSION), False], ids=["c", "python"])


def text(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


def cut(whole: str, cuts: list[int]) -> list[str]:
    """``whole`` cut into pieces of the sizes in ``cuts``, taken in turn and over again."""
    pieces, at, index = [], 0, 0
    while at < len(whole):
        pieces.append(whole[at:at + cuts[index % len(cuts)]])
        at, index = at + cuts[index % len(cuts)], index + 1
    return pieces


def first_trip(detector: RunawayDetector, pieces: list[str], utf8: bool = False) -> int | None:
    """Characters of the whole text up to where ``detector`` tripped, feeding it ``pieces`` in turn (as
    UTF-8 bytes with ``utf8``)."""
    consumed = 0
    for piece in pieces:
        keep = detector.feed_utf8(piece.encode()) if utf8 else detector.feed(piece)
        if keep is not None:
            return consumed + keep
        consumed += len(piece)
    return None


def test_the_corpus_is_there() -> None:
    assert len(LOOPS) >= 12
    assert len(CLEAN) >= 6


@CORES
@pytest.mark.parametrize("name", LOOPS)
def test_loops_are_stopped_with_the_default_thresholds(name: str, native: bool) -> None:
    loop = text(name)
    detector = RunawayDetector.from_config(RunawayConfig(), native)
    keep = detector.feed(loop)
    assert keep is not None, f"{name} was not recognised"
    assert detector.signal == (PUNCTUATION if name in FLOODS else REPETITION)
    assert 0 < keep <= len(loop)
    if len(loop) > 1000:  # a long runaway is stopped well before its end: that is the point
        assert keep < 0.75 * len(loop), (name, keep, len(loop))


@CORES
@pytest.mark.parametrize("name", CLEAN)
def test_clean_texts_are_not_stopped(name: str, native: bool) -> None:
    detector = RunawayDetector.from_config(RunawayConfig(), native)
    assert detector.feed(text(name)) is None, f"{name} was taken for a loop ({detector.signal})"
    assert detector.count > 150  # a real amount of text went through


@CORES
def test_exactly_periodic_data_is_the_false_positive_risk_and_a_higher_threshold_passes_it(native: bool) -> None:
    """A 16x16 identity matrix is periodic (a 1 every 17 words): it trips the defaults; maxRepeats 24
    (the setting the docs give for code-heavy services) lets it through and still stops real loops."""
    matrix = text("clean-code-identity.txt")
    assert RunawayDetector.from_config(RunawayConfig(), native).feed(matrix) is not None
    lenient = RunawayConfig(max_repeats=24)
    assert RunawayDetector.from_config(lenient, native).feed(matrix) is None
    for name in ("loop-sentence.txt", "loop-code.txt", "loop-vllm-tiny-world.txt", "loop-table-row.txt"):
        loop = text(name) * 2
        assert RunawayDetector.from_config(lenient, native).feed(loop) is not None, name


@CORES
def test_a_period_one_loop_trips_after_max_repeats_blocks_of_ngram_size(native: bool) -> None:
    detector = RunawayDetector(ngram_size=4, max_repeats=12, window_tokens=256, native=native)
    words = [" fox"] * 60
    tripped = first_trip(detector, words)
    assert tripped == 52 * 4  # 13 blocks of 4 words: the block seen more than 12 times
    detector = RunawayDetector(ngram_size=1, max_repeats=3, window_tokens=256, native=native)
    assert first_trip(detector, [" no"] * 10) == 4 * 3


@CORES
def test_longer_periods_than_the_window_are_not_recognised(native: bool) -> None:
    sentence = " ".join(f"w{i}" for i in range(40)) + " "
    assert RunawayDetector(window_tokens=32, native=native).feed(sentence * 30) is None
    assert RunawayDetector(window_tokens=64, native=native).feed(sentence * 30) is not None


@CORES
def test_a_punctuation_run_trips_just_past_its_limit(native: bool) -> None:
    detector = RunawayDetector(max_punctuation_run=10, native=native)
    assert detector.feed("ok " + "-" * 9) is None  # 1 space + 9 dashes: 10
    assert detector.feed("-") == 1  # the 11th character of the run
    assert detector.signal == PUNCTUATION
    assert detector.feed("anything") == 0  # stays tripped


@CORES
@settings(max_examples=60, deadline=None)
@given(st.sampled_from(LOOPS + CLEAN + ["clean-code-identity.txt"]), st.lists(st.integers(1, 40), min_size=1))
def test_the_verdict_does_not_depend_on_how_the_text_is_chunked(native: bool, name: str, cuts: list[int]) -> None:
    whole = text(name)
    expected = RunawayDetector(native=native).feed(whole)
    assert first_trip(RunawayDetector(native=native), cut(whole, cuts)) == expected


@CORES
@settings(max_examples=60, deadline=None)
@given(st.sampled_from(LOOPS + CLEAN), st.lists(st.integers(1, 40), min_size=1))
def test_utf8_bytes_get_the_verdict_of_the_same_text(native: bool, name: str, cuts: list[int]) -> None:
    """``feed_utf8`` (what the gateway calls with an event batch's bytes) agrees with ``feed``, ASCII and
    not, wherever the text is cut (at character boundaries, as the engine's events are)."""
    whole = text(name)
    expected = RunawayDetector(native=native).feed(whole)
    assert first_trip(RunawayDetector(native=native), cut(whole, cuts), utf8=True) == expected


@CORES
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", "dd", "a", "b"]), min_size=1, max_size=400),
       st.lists(st.integers(0, 3), max_size=400), st.integers(1, 5), st.integers(2, 4), st.integers(8, 40),
       st.lists(st.integers(1, 30), min_size=1, max_size=20))
def test_feeding_many_words_at_once_equals_feeding_them_one_by_one(
        native: bool, words: list[str], gaps: list[int], ngram: int, repeats: int, window: int,
        cuts: list[int]) -> None:
    """Random texts over a tiny vocabulary repeat all the time: the bulk path and the word-by-word path
    must agree on whether and where they trip, for any way of cutting the text."""
    separators = [" ", ", ", "  ", ". "]
    text = "".join(w + separators[gaps[i] if i < len(gaps) else 0] for i, w in enumerate(words))

    def detector() -> RunawayDetector:
        return RunawayDetector(ngram, repeats, window, 8, native)

    whole = detector().feed(text)
    one_by_one = first_trip(detector(), list(text))
    assert whole == one_by_one == first_trip(detector(), cut(text, cuts))


def test_memory_stays_bounded_on_long_clean_text() -> None:
    detector = RunawayDetector(window_tokens=64, native=False)  # (the C extension's memory is fixed)
    for i in range(20000):
        assert detector.feed(f" word{i * 7919 % 100003}") is None
    assert detector.count == 19999  # the last word waits for its end
    kept = 64 + 4 + (12 - 1) * 4 + 1 + 1  # a window, an n-gram, a probe spacing, one more, and the last feed
    assert len(detector._words) <= 2 * kept
    assert len(detector._text) == sum(map(len, detector._words)) + len(detector._words)
    assert not detector._followed


def test_the_multiples_of_a_followed_period_ride_on_it_until_it_breaks() -> None:
    """In a loop of period 1 every shorter distance repeats too; they are followed under the shortest one,
    so a feed does not have to extend thousands of runs (a runaway request would pay for each)."""
    detector = RunawayDetector(ngram_size=8, max_repeats=10000, window_tokens=4096, native=False)
    for _ in range(400):
        assert detector.feed(" no" * 16) is None
    assert list(detector._followed) == [1]
    assert len(detector._multiples[1]) > 1000
    assert detector.feed(" yes no no") is None  # the loop breaks: none of its multiples goes on either
    assert not detector._followed
    assert not detector._multiples
    assert not detector._owner


def reference_trip(words: list[str], ngram: int, repeats: int, window: int) -> int | None:
    """The definition, by brute force: the first word that ends a stretch of whole periods p <= window
    (blocks of ``-(-ngram // p) * p`` words) repeated more than ``repeats`` times in a row."""
    for i in range(len(words)):
        for period in range(1, window + 1):
            length = (repeats + 1) * (-(-ngram // period) * period)
            if length <= i + 1 and all(words[k] == words[k - period] for k in range(i - length + 1 + period, i + 1)):
                return i
    return None


@CORES
@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", "dd"]), min_size=1, max_size=300), st.integers(1, 5),
       st.integers(2, 4), st.integers(8, 40), st.lists(st.integers(1, 30), min_size=1, max_size=20))
def test_the_detector_trips_where_the_definition_says(
        native: bool, words: list[str], ngram: int, repeats: int, window: int, cuts: list[int]) -> None:
    """Probing only some words must not miss or delay a trip: the detector agrees with a brute-force
    reading of the definition on random texts over a tiny vocabulary (they repeat all the time)."""
    text = "".join(w + " " for w in words)
    expected = reference_trip(words, ngram, repeats, window)
    ends = [len("".join(w + " " for w in words[:k + 1])) - 1 for k in range(len(words))]
    assert first_trip(RunawayDetector(ngram, repeats, window, 10_000, native), cut(text, cuts)) == (
        None if expected is None else ends[expected])


@CORES
def test_long_words_count_in_pieces_so_loops_without_spaces_are_seen(native: bool) -> None:
    assert RunawayDetector(native=native).feed("x" + "ab" * 2000 + " ") is not None
    assert RunawayDetector(native=native).feed("Supercalifragilisticexpialidocious is long. " * 3) is None
    assert RunawayDetector(max_punctuation_run=8, native=native).feed("中文" * 10) is None  # no gap in it


# Pieces of text that matter to the detectors' reading: ASCII and other letters, a word longer than a piece,
# ideographs and kana (a word each; "・" is a gap too), gaps, emoji, a lone surrogate (from a JSON escape).
TEXT_PIECES = ["a", "b", "dd", "_", "7", " ", ", ", "\n", "!!", "é", "Ωmega", "x" * 17, "中", "文", "・", "ー",
               "😀", "\ud800", "  "]


@NO_EXTENSION
@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(TEXT_PIECES), max_size=120).map("".join), st.integers(1, 5), st.integers(2, 4),
       st.integers(8, 40), st.integers(3, 12), st.lists(st.integers(1, 12), min_size=1, max_size=10))
def test_the_c_extension_detects_exactly_as_the_python_detector(
        body: str, ngram: int, repeats: int, window: int, punctuation: int, cuts: list[int]) -> None:
    """Feed by feed, as text and as UTF-8 bytes: the same trip point and signal, and the same words seen."""
    for as_bytes in (False, True):
        native, python = (RunawayDetector(ngram, repeats, window, punctuation, flag) for flag in (True, False))
        for piece in cut(body, cuts):
            if as_bytes:
                data = piece.encode("utf-8", "surrogatepass")
                verdicts = native.feed_utf8(data), python.feed_utf8(data)
            else:
                verdicts = native.feed(piece), python.feed(piece)
            assert verdicts[0] == verdicts[1]
            assert native.signal == python.signal
            if native.signal is not None:
                break  # (the words seen past a trip point are no one's business)
            assert native.count == python.count


# ---- reading engine events --------------------------------------------------------------------------------

def chunk(choice: dict[str, Any], **extra: Any) -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
            "choices": [choice], "usage": {"prompt_tokens": 5, "total_tokens": 6, "completion_tokens": 1}, **extra}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize(("choice", "expected"), [
    ({"index": 0, "delta": {"content": " hello"}, "logprobs": None, "finish_reason": None}, [(0, " hello")]),
    ({"index": 3, "delta": {"content": ' a "quoted" \\ one\n'}}, [(3, ' a "quoted" \\ one\n')]),
    ({"index": 0, "delta": {"role": "assistant", "content": ""}}, []),
    ({"index": 0, "delta": {"reasoning": "hmm"}}, [(0, "hmm")]),
    ({"index": 0, "delta": {"content": "b", "reasoning": "a"}}, [(0, "a"), (0, "b")]),
    ({"index": 0, "delta": {"tool_calls": [{"id": "c", "type": "function", "index": 0,
                                            "function": {"name": "f", "arguments": "{\"x\": 1"}}]}},
     [(0, '{"x": 1')]),
    ({"index": 1, "text": " quick", "logprobs": None, "finish_reason": None}, [(1, " quick")]),
    ({"index": 0, "text": "é ü 中", "logprobs": {"tokens": ["é"], "text_offset": [0]}}, [(0, "é ü 中")]),
], ids=["chat", "escapes", "role-only", "reasoning", "reasoning-then-content", "tool-call", "completion",
        "unicode-with-logprobs"])
def test_stream_events_are_read_without_decoding_json(choice: dict[str, Any], expected: list[Any]) -> None:
    payload = chunk(choice)
    assert stream_texts(payload) == expected
    assert sorted(body_texts(json.loads(payload))) == sorted(expected)


def test_other_event_shapes() -> None:
    assert stream_texts(b'{"model_name":"tiny","model_version":"1","text_output":" tok"}') == [(0, " tok")]
    two = json.dumps({"choices": [{"index": 0, "text": "a"}, {"index": 1, "text": "b"}]}).encode()
    assert stream_texts(two) == [(0, "a"), (1, "b")]
    assert stream_texts(b'{"id":"x","choices":[],"usage":{"completion_tokens":3}}') == []


def guard(single: str | None = None, **config: Any) -> tuple[RunawayGuard, list[str]]:
    trips: list[str] = []
    shape = SINGLE_CHOICE_SHAPES[single] if single else None
    return RunawayGuard(RunawayConfig(enabled=True, **config), trips.append, shape), trips


def test_the_guard_keeps_one_detector_per_choice() -> None:
    watch, trips = guard(ngram_size=1, max_repeats=3)
    interleaved = [chunk({"index": i % 2, "delta": {"content": " yes" if i % 2 == 0 else " no"}}) for i in range(6)]
    assert watch.check(interleaved) is None  # each choice alone: 3 words, the last still open
    # A word counts once the next piece of text shows it ended (" no" could go on as " none"): the 4th
    # " no" of choice 1 is seen when the 5th arrives.
    assert watch.check([chunk({"index": 1, "delta": {"content": " no"}})]) is None
    stop = watch.check([chunk({"index": 1, "delta": {"content": " no"}})])
    assert stop is not None
    assert (stop.reason, stop.finish_reason) == ("runaway", "length")
    assert trips == [REPETITION]
    assert set(watch.detectors) == {0, 1}


@pytest.fixture(params=["native", "python"])
def extraction(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the one-choice path reads event text: the C extension (where it was compiled) and Python."""
    if request.param == "native" and runaway_hook.native_string_bodies is None:
        pytest.skip("the optional C extension tensorfleet.gateway._textscan was not compiled here")
    if request.param == "python":
        monkeypatch.setattr(runaway_hook, "native_string_bodies", None)
    return str(request.param)


@pytest.mark.usefixtures("extraction")
@pytest.mark.parametrize("single", ["chat", None], ids=["one-choice", "general"])
def test_a_stream_is_checked_every_few_events_and_stopped_at_a_batch_end(single: str | None) -> None:
    watch, trips = guard(single)
    events = [chunk({"index": 0, "delta": {"content": " fox"}, "finish_reason": None})] * 200
    stopped_at = next(i for i, e in enumerate(events, start=1) if watch.on_event(e) is not None)
    assert stopped_at == 64  # tripped at the 53rd event (52 words seen), stopped at the end of its batch
    assert stopped_at % CHECK_EVERY == 0
    assert trips == [REPETITION]


@pytest.mark.usefixtures("extraction")
def test_the_one_choice_path_reads_escapes_and_falls_back_for_other_shapes() -> None:
    watch, _ = guard("chat", max_punctuation_run=8)
    quoted = [chunk({"index": 0, "delta": {"content": ' "\\q\\"'}}) for _ in range(3)]
    assert watch.check(quoted) is None
    assert watch.detectors[0].count == 3  # the three q between escaped quotes and backslashes
    mixed = [chunk({"index": 0, "delta": {"reasoning": "?" * 5}}), chunk({"index": 0, "delta": {"content": "!" * 5}})]
    assert watch.check(mixed) is not None  # one event is not of the usual shape: read one by one, in order


# Pieces of event bytes that matter to a string scanner: the shapes' prefixes, quotes, escapes, closings.
EVENT_PIECES = [b'{"content":"', b',"text":"', b'"text_output":"', b'"', b"\\", b'\\"', b"\\\\", b"}", b",",
                b'"}', b'",', b" fox", b"\\n", b"\xe4\xb8\x80", b'{"index":0,"delta":', b"\n\n"]


@pytest.mark.skipif(runaway_hook.native_string_bodies is None, reason="the optional C extension was not compiled here")
@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(EVENT_PIECES), max_size=40).map(b"".join),
       st.sampled_from(sorted(SINGLE_CHOICE_SHAPES)))
def test_the_c_extension_reads_event_text_exactly_as_the_regular_expression(data: bytes, name: str) -> None:
    shape = SINGLE_CHOICE_SHAPES[name]
    assert shape.texts(data) == shape.texts_in_python(data)


@pytest.mark.skipif(runaway_hook.native_string_bodies is None, reason="the optional C extension was not compiled here")
def test_the_c_extension_reads_real_event_batches() -> None:
    shape = SINGLE_CHOICE_SHAPES["chat"]
    texts = [" fox", ' "quoted\\" \\', "\n", "一", ""]
    events = b"".join(chunk({"index": 0, "delta": {"content": t}, "finish_reason": None}) for t in texts)
    bodies, count = shape.texts(events)
    assert count == len(texts)
    assert json.loads(b'"' + bodies + b'"') == "".join(texts)
    assert shape.texts(b"") == (b"", 0)
    assert shape.texts(b'{"content":"unterminated') == (b"", 0)


def test_a_whole_body_is_cut_where_the_loop_was_recognised() -> None:
    watch, trips = guard(max_punctuation_run=20)
    body: dict[str, Any] = {"object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Done" + "!" * 100}, "finish_reason": "length",
         "stop_reason": None},
        {"index": 1, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}]}
    assert watch.on_body(body) is not None
    assert body["choices"][0]["message"]["content"] == "Done" + "!" * 21
    assert body["choices"][1]["message"]["content"] == "fine"
    assert trips == [PUNCTUATION]
    triton = {"text_output": "ok" + "." * 300}
    assert guard()[0].on_body(triton) is not None
    assert triton["text_output"] == "ok" + "." * 201


TABLE = "Fill in, one value per line:\n" + "x = 0\n" * 40


@pytest.mark.parametrize("request_body", [
    {"prompt": TABLE, "echo": True},
    {"prompt": ["short", TABLE], "n": 2, "echo": True},
    {"messages": [{"role": "user", "content": "go on"}, {"role": "assistant", "content": TABLE}], "echo": True},
], ids=["completions", "batch", "chat"])
def test_an_echoed_prompt_in_a_whole_answer_is_not_judged_and_a_loop_after_it_is_cut(
        request_body: dict[str, Any]) -> None:
    chat = "messages" in request_body
    index = 2 if "n" in request_body else 0  # the first choice of the second prompt

    def answer(generated: str) -> dict[str, Any]:
        part = {"message": {"role": "assistant", "content": TABLE + generated}} if chat else {"text": TABLE + generated}
        return {"choices": [{"index": index, **part, "finish_reason": "length"}]}

    watch = RunawayGuard(RunawayConfig(enabled=True), [].append, echo=EchoedPrompt(request_body))
    clean = answer(" x = 3, y = 4 and the rest as before.")
    assert watch.on_body(clean) is None
    looping = answer(" fox" * 200)
    assert watch.on_body(looping) is not None
    kept = looping["choices"][0]["message"]["content"] if chat else looping["choices"][0]["text"]
    assert kept.startswith(TABLE + " fox fox")
    assert len(kept) < len(TABLE) + 4 * 100


def test_an_echoed_prompt_in_a_stream_is_not_judged() -> None:
    echo = EchoedPrompt({"prompt": [TABLE, [1, 2, 3]], "echo": True})
    assert echo.generated(0, TABLE + " first") == " first"
    assert echo.generated(0, TABLE) == TABLE  # after the first text: all generated
    assert echo.generated(1, "decoded token ids first") == ""  # echoed text the gateway does not know
    chat = EchoedPrompt({"messages": [{"role": "assistant", "content": TABLE}], "echo": True})
    assert chat.generated(0, " first") == " first"  # chat streams the echo in events with no tokens


def test_the_hook_is_off_by_default_and_counts_stops_per_model() -> None:
    from gateway_support import gateway_document
    from tensorfleet.gateway import config as gwconfig

    def request(body: dict[str, Any], endpoint: str = "/v1/chat/completions") -> ProxyRequest:
        return ProxyRequest(request_id="r", endpoint=endpoint, tenant="t", body=body, raw=b"", streaming=True,
                            received=0.0, received_at=0.0, billable=True)

    chat = request({"model": "tiny", "messages": []})
    metrics = GatewayMetrics()
    off = gwconfig.parse(gateway_document())
    assert RunawayHook(lambda: off, metrics).open(chat) is None
    on = gwconfig.parse(gateway_document(tokenPolicy={"runaway": {"enabled": True, "maxPunctuationRun": 8}}))
    hook = RunawayHook(lambda: on, metrics)
    watch = hook.open(chat)
    assert watch is not None
    assert watch.check([chunk({"index": 0, "delta": {"content": "?" * 9}})]) is not None
    value = metrics.registry.get_sample_value("tensorfleet_gateway_runaway_stops_total",
                                              {"model": "tiny", "signal": PUNCTUATION})
    assert value == 1.0
    shapes = {name: hook.open(request(body, endpoint))._single for name, body, endpoint in (  # type: ignore[union-attr]
        ("chat", {"messages": []}, "/v1/chat/completions"), ("completions", {"prompt": "a"}, "/v1/completions"),
        ("batch", {"prompt": ["a", "b"]}, "/v1/completions"), ("n", {"messages": [], "n": 2}, "/v1/chat/completions"),
        ("triton", {"text_input": "a"}, "/v2/models/{model}/generate_stream"))}
    assert shapes == {"chat": SINGLE_CHOICE_SHAPES["chat"], "completions": SINGLE_CHOICE_SHAPES["completions"],
                        "batch": None, "n": None, "triton": SINGLE_CHOICE_SHAPES["triton"]}
