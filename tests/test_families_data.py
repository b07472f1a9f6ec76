"""Chat templates of Qwen2.5, Qwen3, Gemma 3 and Mistral in data.prepare, and their end of turn.

The templates are our own Jinja following each family's format; the tokenizers are tiny
byte-level BPEs trained here with each family's special tokens.
"""

from __future__ import annotations

import json

import pytest

from apo_jax.data import prepare, schema, tokenize
from apo_jax.eval import generation

QWEN = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen3: reasoning of assistant turns after the last user turn is kept in a <think> block (an
# empty one when there is none); earlier turns lose it.
QWEN3 = (
    "{% set ns = namespace(last=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}{% set reasoning = '' %}"
    "{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "{% if loop.index0 > ns.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content }}"
    "{% else %}{{ '<|im_start|>assistant\\n' + content }}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Gemma 3: BOS, a system message folded into the first user turn, the assistant is "model".
GEMMA3 = (
    "{{ bos_token }}{% set sys = '' %}"
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (sys if loop.first else '') + m['content'] | trim"
    " + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
# Mistral (v0.3 style): BOS, [INST] user [/INST] answer</s>; the prompt has no generation header.
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + '[/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

SPEC = {
    "qwen2": (
        QWEN,
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
    ),
    "qwen3": (
        QWEN3,
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|im_end|>",
    ),
    "gemma3": (
        GEMMA3,
        dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"),
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "<end_of_turn>",
    ),
    "mistral": (
        MISTRAL,
        dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
        ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
        "</s>",
    ),
}
TEXTS = ["What is 2 + 3?", "2 + 3 = 5.", "2 + 3 = 6.", "Be exact.", "Let me add them."] * 4


@pytest.fixture(scope="module")
def family_tokenizer(tmp_path_factory):
    """Factory: family -> tokenizer directory (tiny BPE, the family's tokens and template)."""
    made = {}

    def make(family: str) -> str:
        if family in made:
            return made[family]
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        template, tokens, specials, _ = SPEC[family]
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=specials,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tk.train_from_iterator(TEXTS, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=template, **tokens)
        if family == "qwen3":
            fast.add_tokens(["<think>", "</think>"])  # ordinary added tokens, as in Qwen3
        path = str(tmp_path_factory.mktemp(f"tok_{family}"))
        fast.save_pretrained(path)
        made[family] = path
        return path

    return make


PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3", "mistral"])
def test_split_pair_with_family_template(family_tokenizer, family):
    tok = tokenize.load_tokenizer(family_tokenizer(family))
    eot = SPEC[family][3]
    p, c, r = tokenize.split_pair(tok, PROMPT, "2 + 3 = 5.", "2 + 3 = 6.")
    prompt_text = tok.decode(p)
    if family.startswith("qwen"):  # no BOS; Qwen2.5's template adds a default system turn
        first = "system" if family == "qwen2" else "user"
        assert prompt_text.startswith(f"<|im_start|>{first}\n")
        assert prompt_text.endswith("<|im_start|>assistant\n")
    elif family == "gemma3":
        assert prompt_text.startswith("<bos><start_of_turn>user\nWhat is 2 + 3?<end_of_turn>\n")
        assert prompt_text.endswith("<start_of_turn>model\n")
    else:
        assert prompt_text == "<s>[INST] What is 2 + 3?[/INST]"
    completion = tok.decode(c)
    assert "2 + 3 = 5." in completion and eot in completion and "6." in tok.decode(r)
    if family == "qwen3":  # the last turn keeps an (empty) reasoning block
        assert completion.startswith("<think>\n\n</think>\n\n2 + 3 = 5.")
    # generation stops on the family's end of turn, from the tokenizer alone
    eot_id = tok.convert_tokens_to_ids(eot)
    assert tokenize.end_of_turn_ids(tok)[0] == eot_id
    assert eot_id in generation.stop_token_ids(tok)
    assert eot_id in c


def test_qwen3_reasoning_in_earlier_turns_is_rejected_with_its_reason(family_tokenizer, tmp_path):
    tok_dir = family_tokenizer("qwen3")
    history = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<think>Let me add them.</think>2 + 3 = 5."},
        {"role": "user", "content": "Be exact."},
    ]
    clean = [dict(history[1], content="2 + 3 = 5.")]
    rows = [
        {"prompt": history, "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."},
        {"prompt": [history[0], *clean, history[2]], "chosen": "5.", "rejected": "6."},
        {"prompt": PROMPT, "chosen": "<think>Let me add them.</think>5.", "rejected": "6."},
        {"prompt": PROMPT, "chosen": "<think>\nLet me add them.\n</think>\n\n5.", "rejected": "6."},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = prepare.prepare(str(src), tok_dir, str(tmp_path / "out"))
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert manifest["counts"]["written"] == 2, manifest["counts"]
    got = sorted((r["line"], r["field"], r["reason"]) for r in rejects)
    assert got == [
        (1, "prompt[1].content", schema.TEMPLATE_REWRITES_TEXT),
        (3, "chosen", schema.TEMPLATE_REWRITES_TEXT),
    ]
