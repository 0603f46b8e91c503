"""Build the tiny random-weight Llama that tests/engine serves with a real vLLM, offline and seeded.

    <vllm venv>/bin/python tests/engine/build_tiny_model.py OUT_DIR

Run with the vLLM venv's python (``.ci/install-vllm`` does): it needs torch, transformers and tokenizers,
which are not agentperf's dependencies. Nothing is downloaded: no hub can be reached from CI, so the
weights are random (seeded) and the tokenizer is a byte-level BPE trained here on Python's own standard
library sources. Random weights produce garbage text; agentperf sends ``ignore_eos`` so output lengths
are still exact, which is all the accounting tests need.

Why this size: 2 layers and hidden 256 prefill 6-16K tokens/s on one core, so a replay of a small
synthetic set runs in seconds, and ``max_position_embeddings`` 32768 fits the longest contexts of the
test trajectories (tests/engine serves it with ``--max-model-len`` 32768).

The same model every time (same weights, same tokenizer) on a given Python: the weights come from
``torch.manual_seed`` and the tokenizer's training text is a fixed, sorted list of files.
"""

from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

SEED = 0
VOCAB_SIZE = 16384
TRAINING_BYTES = 4_000_000  # enough text for 16K merges; more only slows the build
EOS = "<|im_end|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", EOS)

# ChatML with Hermes-style tools (the server runs ``--tool-call-parser hermes``): the tool definitions go into
# the system turn, an assistant's tool calls are rendered as <tool_call> JSON, tool results as a "tool" turn.
# vLLM hands the template each call's arguments as a dict (it parses the JSON string), so both are accepted.
CHAT_TEMPLATE = """\
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content -%}{%- for part in content -%}{{ part.text if part.text is defined else '' }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set rest = messages[1:] if messages and messages[0].role == 'system' else messages -%}
{%- if tools -%}
<|im_start|>system
{% if messages and messages[0].role == 'system' %}{{ text(messages[0].content) }}

{% endif %}# Tools

You may call functions. Their signatures, within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% elif messages and messages[0].role == 'system' -%}
<|im_start|>system
{{ text(messages[0].content) }}<|im_end|>
{% endif -%}
{%- for message in rest -%}
{%- if message.role == 'assistant' -%}
<|im_start|>assistant
{{ text(message.content) }}
{%- for call in message.tool_calls or [] %}{{ '\\n' }}<tool_call>
{"name": {{ call.function.name | tojson }}, "arguments": \
{% if call.function.arguments is string %}{{ call.function.arguments }}{% else %}{{ call.function.arguments | tojson }}{% endif %}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' -%}
<|im_start|>tool
<tool_response>
{{ text(message.content) }}
</tool_response><|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ text(message.content) }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""


def training_files() -> list[Path]:
    """Python's standard library sources, sorted, up to TRAINING_BYTES: local text every machine has."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen, total = [], 0
    for path in sorted(stdlib.glob("*.py")) + sorted(stdlib.glob("*/*.py")):
        if total >= TRAINING_BYTES or "site-packages" in path.parts:
            continue
        chosen.append(path)
        total += path.stat().st_size
    if not chosen:
        raise SystemExit(f"build_tiny_model: no Python sources under {stdlib} to train a tokenizer on")
    return chosen


def build_tokenizer(out: Path) -> None:
    """A byte-level BPE (any text encodes, nothing is unknown) with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(p) for p in training_files()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, model_max_length=32768)
    fast.save_pretrained(out)
    # The chat template goes into tokenizer_config.json itself (where every transformers and vLLM version
    # looks), not into the chat_template.jinja file newer transformers would write beside it.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def build_model(out: Path, vocab_size: int) -> None:
    """2 layers, hidden 256, grouped-query attention (4 heads, 2 KV heads); random bf16 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=SPECIAL_TOKENS.index(EOS), pad_token_id=0,
                         torch_dtype="bfloat16")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: build_tiny_model.py OUT_DIR")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    vocab_size = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    build_model(out, max(vocab_size, VOCAB_SIZE))


if __name__ == "__main__":
    main()
