"""model=hf refuses what it cannot compute exactly, before any process starts (config error,
exit 2), and the weight import names every missing, unexpected or misshapen tensor."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_ext.config.fields import ConfigError
from megatron_ext.config.load import checked_config, compose_config
from megatron_ext.config.validate import validate
from tests.hf_tiny import VOCAB, make_hf_model, save_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    make_hf_model("qwen3", str(path))
    return path


def _with_config(tmp_path, src, **changes):
    """A copy of src's config.json (and tokenizer) in tmp_path, with `changes`."""
    config = json.load(open(src / "config.json"))
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_tokenizer(str(tmp_path))
    return tmp_path


def test_shape_comes_from_config_json(qwen3_dir):
    cfg = compose_config(["model=hf", f"model.hf_path={qwen3_dir}"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.kv_channels, m.ffn_hidden_size, m.vocab_size) == (
        4, 32, 16, 48, VOCAB)
    assert m.qk_layernorm and not m.qkv_bias and not m.tie_embeddings
    assert cfg.data.tokenizer == str(qwen3_dir)  # the tokenizer defaults to the HF folder
    validate(cfg, 2)


@pytest.mark.parametrize("changes, words", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures=['GPT2LMHeadModel'] is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_scaling type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 4096}},
     "original_max_position_embeddings"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
])
def test_unsupported_config_is_a_config_error(tmp_path, qwen3_dir, capsys, changes, words):
    folder = _with_config(tmp_path, qwen3_dir, **changes)
    with pytest.raises(SystemExit) as exit_:
        checked_config(["model=hf", f"model.hf_path={folder}"], 1)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error:") and words in err, err


def test_missing_folder_config_and_path(tmp_path):
    for overrides, words in ([["model=hf"], "needs model.hf_path=DIR"],
                             [["model=hf", f"model.hf_path={tmp_path}/nope"], "is not a folder"],
                             [["model=hf", f"model.hf_path={tmp_path}"], "has no config.json"]):
        with pytest.raises(ConfigError, match=words):
            validate(compose_config(overrides), 1)


def test_kv_heads_not_divisible_by_tp(qwen3_dir):
    cfg = compose_config(["model=hf", f"model.hf_path={qwen3_dir}", "parallel.tp=4"])
    with pytest.raises(ValueError, match="model.num_query_groups=2 is not divisible by parallel.tp=4"):
        validate(cfg, 4)


def test_missing_tokenizer(tmp_path, qwen3_dir):
    from megatron_ext.data.tokenizer import build_tokenizer
    config = json.load(open(qwen3_dir / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="is a folder without tokenizer.json"):
        validate(compose_config(["model=hf", f"model.hf_path={tmp_path}"]), 1)
    with pytest.raises(ValueError, match="no usable tokenizer in that folder"):
        build_tokenizer(str(tmp_path))


def test_hf_tokenizer_eos_and_chat_template(qwen3_dir):
    from transformers import AutoTokenizer

    from megatron_ext.data.tokenizer import build_tokenizer
    ours, theirs = build_tokenizer(str(qwen3_dir)), AutoTokenizer.from_pretrained(str(qwen3_dir))
    assert ours.eos_id == theirs.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "user", "content": "what is 12 + 30?"}]
    assert ours.chat(messages) == theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours.encode("the answer is 42") == theirs("the answer is 42")["input_ids"]


def test_weight_accounting_names_missing_unexpected_and_misshapen(tmp_path, qwen3_dir):
    from safetensors.torch import load_file, save_file

    from megatron_ext.convert.hf_load import HFWeights, HFWeightsError, account
    weights = {}
    for name in os.listdir(qwen3_dir):
        if name.endswith(".safetensors"):
            weights.update(load_file(qwen3_dir / name))
    weights.pop("model.layers.1.mlp.down_proj.weight")
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(HFWeightsError) as err:
        account(HFWeights(str(tmp_path)), "Qwen3ForCausalLM", False, 4)
    assert "missing ['model.layers.1.mlp.down_proj.weight']" in str(err.value)
    assert "unexpected ['model.layers.0.self_attn.extra.weight']" in str(err.value)
    with pytest.raises(HFWeightsError, match=r"model.norm.weight has shape \[32\], config.json "
                                             r"implies \[16\]"):
        HFWeights(str(tmp_path)).read("model.norm.weight", [16])


def test_pickles_only_are_refused(tmp_path):
    from megatron_ext.convert.hf_load import HFWeights, HFWeightsError
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(HFWeightsError, match="pytorch_model.*save_pretrained"):
        HFWeights(str(tmp_path))


def test_import_cli_exit_2_on_bad_weights(tmp_path, qwen3_dir):
    from safetensors.torch import load_file, save_file
    folder = _with_config(tmp_path / "bad", qwen3_dir) if (tmp_path / "bad").mkdir() is None else None
    weights = {}
    for name in os.listdir(qwen3_dir):
        if name.endswith(".safetensors"):
            weights.update(load_file(qwen3_dir / name))
    weights["model.layers.2.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, folder / "model.safetensors")
    r = subprocess.run([sys.executable, "-m", "megatron_ext.convert", "import", "--hf", str(folder),
                        "--out", str(tmp_path / "ckpt")], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "model.layers.2.self_attn.o_proj.weight has shape [3, 3]" in r.stderr


def test_eos_prefers_the_tokenizers_end_of_turn_among_generation_eos_ids(tmp_path):
    from megatron_ext.data.tokenizer import build_tokenizer
    save_tokenizer(str(tmp_path))  # its eos_token is <|im_end|> (id 2)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert build_tokenizer(str(tmp_path)).eos_id == 2
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert build_tokenizer(str(tmp_path)).eos_id == 0
