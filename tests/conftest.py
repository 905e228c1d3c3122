"""Tiny random models for fast unit tests (hidden 64, 2-3 layers). Quality claims never come from these."""
import json

import pytest
import torch
import transformers

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=128, max_position_embeddings=256, head_dim=8)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v carry biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),  # q/k norms over head_dim
}


def strict_json_loads(text: str):
    """json.loads that fails on NaN / Infinity: what a reader other than Python's would do."""
    def reject(token):
        raise AssertionError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=reject)


def tiny_model(family="llama", seed=0, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, config_name)(**{**TINY, **extra, **overrides})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    # random init leaves biases at zero: give them values so bias slicing is exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.02)
    return model


# A chat template in the style of instruct models: a default system prompt, role markers, an end-of-turn marker.
TINY_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|>You are a tiny helpful test model made by slimc<|end|>"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def char_tokenizer(chat_template=None):
    """A real (character-level) fast tokenizer: 44 specials then printable ASCII (vocab_size >= 139); eos <1>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(44)}
    vocab.update({chr(c): 44 + i for i, c in enumerate(range(32, 127))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()  # characters back into text, no spaces between them
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", eos_token="<1>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def save_tiny_dir(d, family="llama", chat_template=None, **overrides):
    """A tiny model saved as a local HF directory with a real (character-level) tokenizer file; returns d."""
    tiny_model(family, **overrides).save_pretrained(d)
    char_tokenizer(chat_template).save_pretrained(d)
    return d


class ByteTokenizer:
    """Stand-in tokenizer (one token per byte, mod vocab) for tests that need no real vocabulary."""

    def __init__(self, vocab=128):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [b % self.vocab for b in text.encode()]
        return {"input_ids": ids}


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


def reload_without_slimc(out, ids, tmp_path):
    """Load OUT in a fresh interpreter where importing slimc fails (only transformers and the checkpoint's own
    files), tokenizer too, stdin closed so nothing may ask a question; returns (logits of `ids`, the words it
    printed: tokenizer class, model class, parameter count, and everything it wrote)."""
    import os
    import subprocess
    import sys
    import textwrap

    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["slimc"] = None
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        with torch.no_grad():
            torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'logits.pt')!r})
        print(type(tok).__name__, type(m).__name__, sum(p.numel() for p in m.parameters()))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(tmp_path / "logits.pt"), proc.stdout.split(), proc.stdout + proc.stderr
