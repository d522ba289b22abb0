"""Make a tiny, randomly initialised Llama and a locally trained tokenizer for tests (no model hub).

Run with the engines' virtualenv (it has torch, transformers and tokenizers):
    .venv-vllm/bin/python tests/engines/make_tiny_llama.py OUT_DIR
The model is tiny (two layers, hidden 64, head_dim 32) so vLLM starts on CPU in under a minute.
Idempotent: an existing complete OUT_DIR is left alone.
"""

from __future__ import annotations

import json
import pathlib
import sys

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# A small corpus made here: the tokenizer only needs a vocabulary, not good segmentation.
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "engineers", "meter",
         "tokens", "on", "many", "gpus", "and", "gateways", "stream", "every", "chunk", "to", "clients",
         "who", "pay", "for", "what", "they", "use", "hello", "world", "warm", "up", "system", "user",
         "assistant", "prompt", "long", "short", "batch", "tenant", "budget", "cache", "hit", "miss")


def corpus() -> list[str]:
    lines = []
    for i in range(2000):
        lines.append(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) + f" {i} .,;:!?")
    return lines


def build(out: pathlib.Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)

    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, tie_word_embeddings=True)
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "COMPLETE").write_text(json.dumps({"vocab": len(fast)}))


def main() -> None:
    out = pathlib.Path(sys.argv[1])
    if not (out / "COMPLETE").exists():
        build(out)
    print(out)


if __name__ == "__main__":
    main()
