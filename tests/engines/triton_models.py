"""A real tritonserver (from nvidia-pytriton) with a tiny generate model and a tokenizer model, for tests.

Run with the Triton virtualenv: ``.venv-triton/bin/python tests/engines/triton_models.py PORT``.
The models mimic TensorRT-LLM's repository layout, not its numerics: ``tiny`` takes ``text_input``,
``max_tokens`` and ``stream`` and answers ``text_output`` (one response per token when streaming,
decoupled like the TensorRT-LLM ensemble): the words w0, w1, ..., or, for a prompt starting with
"repeat:", the prompt's other words over and over (a degenerate loop, for runaway control);
``preprocessing`` counts tokens (whitespace-separated words) from ``QUERY`` into ``REQUEST_INPUT_LEN``
like TensorRT-LLM's preprocessing model.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def _input(request: object, name: str, default: object) -> object:
    try:
        return np.asarray(request[name]).reshape(-1)[0]  # type: ignore[index]
    except KeyError:
        return default


def _text(value: object) -> str:
    item = np.asarray(value).reshape(-1)[0]
    return item.decode() if isinstance(item, bytes) else str(item)


def generate(requests: list[dict[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    for request in requests:
        prompt = _text(request["text_input"])
        count = int(_input(request, "max_tokens", 8))  # type: ignore[call-overload]
        stream = bool(_input(request, "stream", False))
        looped = prompt.split()[1:] if prompt.startswith("repeat:") else None
        words = [looped[i % len(looped)] if looped else f"w{i}" for i in range(count)]
        if stream:
            for word in words:
                time.sleep(0.005)
                yield [{"text_output": np.array([(" " + word).encode()], dtype=object)}]
        else:
            text = " ".join(words)  # generated text only, like TensorRT-LLM's exclude_input_in_output
            del prompt
            yield [{"text_output": np.array([text.encode()], dtype=object)}]


@batch
def tokenize(QUERY: np.ndarray, REQUEST_OUTPUT_LEN: np.ndarray) -> dict[str, np.ndarray]:
    counts = [len(_text(row).split()) for row in QUERY]
    return {"REQUEST_INPUT_LEN": np.array(counts, dtype=np.int32).reshape(-1, 1)}


def main() -> None:
    port = int(sys.argv[1])
    config = TritonConfig(http_address="127.0.0.1", http_port=port, grpc_address="127.0.0.1", grpc_port=port + 1,
                          metrics_port=port + 2, allow_metrics=True, log_verbose=0)
    with Triton(config=config) as triton:
        triton.bind(model_name="tiny", infer_func=generate,
                    inputs=[Tensor(name="text_input", dtype=bytes, shape=(1,)),
                            Tensor(name="max_tokens", dtype=np.int32, shape=(1,), optional=True),
                            Tensor(name="stream", dtype=np.bool_, shape=(1,), optional=True)],
                    outputs=[Tensor(name="text_output", dtype=bytes, shape=(1,))],
                    config=ModelConfig(batching=False, decoupled=True), strict=False)
        triton.bind(model_name="preprocessing", infer_func=tokenize,
                    inputs=[Tensor(name="QUERY", dtype=bytes, shape=(1,)),
                            Tensor(name="REQUEST_OUTPUT_LEN", dtype=np.int32, shape=(1,))],
                    outputs=[Tensor(name="REQUEST_INPUT_LEN", dtype=np.int32, shape=(1,))],
                    config=ModelConfig(max_batch_size=8), strict=False)
        triton.serve()


if __name__ == "__main__":
    main()
