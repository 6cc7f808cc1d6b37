"""Tiny random Hugging Face models saved with transformers' save_pretrained (never downloaded),
for the HF import/export tests: vocab 300 (not a multiple of 128), 4 layers, several shards."""
from __future__ import annotations

import torch

VOCAB = 300
_SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
              rms_norm_eps=1e-5)


def hf_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    if kind == "llama_tied":  # Llama 3.2 style: tied, llama3 RoPE scaling that bites at d=8
        return LlamaConfig(**_SHAPE, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 1000000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    if kind == "llama_linear":  # untied, linear position interpolation
        return LlamaConfig(**_SHAPE, tie_word_embeddings=False, rope_parameters={
            "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if kind == "qwen2_tied":  # Qwen2.5-0.5B style: QKV bias, tied, no lm_head in the file
        return Qwen2Config(**_SHAPE, tie_word_embeddings=True)
    if kind == "qwen3":  # QK-norm, head_dim 16 != hidden / heads = 8
        return Qwen3Config(**_SHAPE, head_dim=16, tie_word_embeddings=False)
    raise KeyError(kind)


KINDS = ("llama_tied", "llama_linear", "qwen2_tied", "qwen3")


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def save_tokenizer(path: str) -> None:
    """A byte-level BPE of at most VOCAB tokens (256 bytes, merges, 3 specials) with a ChatML
    template and <|im_end|> as EOS, saved as the HF tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the answer is 12 + 30 = 42. " * 20, "hello world, how are you?"] * 50,
                            trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()  # config.json may have more rows
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(path)


def make_hf_model(kind: str, path: str, seed: int = 0):
    """A random fp32 model of `kind` saved in `path` in several safetensors shards; returned
    in eval mode. Every weight (norms and biases too) is non-trivial."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(kind), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, max_shard_size="40KB")
    model.generation_config.save_pretrained(path)
    save_tokenizer(path)
    return model.eval()


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
