"""ModelConfig: published GPT-OSS-20B values and Hugging Face config.json files."""

import json

import pytest

from kvq.config import FULL, SLIDING, ModelConfig
from kvq.errors import ConfigError

GPT_OSS_20B_JSON = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "rope_scaling": {"factor": 32.0, "rope_type": "yarn"},
    "rope_theta": 150000,
    "sliding_window": 128,
    "vocab_size": 201088,
}
LLAMA_3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "vocab_size": 128256,
}
MISTRAL_7B_V01 = {
    "model_type": "mistral",
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "sliding_window": 4096,
    "rope_theta": 10000.0,
    "vocab_size": 32000,
}
QWEN2_7B = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 28,
    "vocab_size": 152064,
}
GPT2 = {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}
BERT_BASE = {
    "model_type": "bert",
    "hidden_size": 768,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 512,
    "vocab_size": 30522,
}


def write(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def test_gpt_oss_20b_published_values():
    cfg = ModelConfig.gpt_oss_20b()
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (24, 64, 8)
    assert (cfg.head_dim, cfg.hidden_size, cfg.sliding_window) == (64, 2880, 128)
    assert cfg.layer_types[:3] == (SLIDING, FULL, SLIDING) and len(cfg.layer_types) == 24
    assert cfg.num_full_layers == cfg.num_sliding_layers == 12
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta) == (201088, 131072, 1.5e5)
    assert (cfg.num_local_experts, cfg.experts_per_token) == (32, 4)
    assert cfg.kv_values_per_token == 2 * 8 * 64 == 1024
    assert cfg.gqa_ratio == 8


@pytest.mark.parametrize("as_directory", [False, True])
def test_from_pretrained_gpt_oss_matches_published(tmp_path, as_directory):
    path = write(tmp_path, GPT_OSS_20B_JSON)
    cfg = ModelConfig.from_pretrained(tmp_path if as_directory else path)
    assert cfg == ModelConfig.gpt_oss_20b()
    assert cfg.extra["rope_scaling"]["rope_type"] == "yarn"
    assert cfg.extra["attention_bias"] is True
    assert "num_hidden_layers" not in cfg.extra


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LLAMA_3_8B, {"kv": 8, "head_dim": 128, "window": None, "kinds": {FULL}}),
        (MISTRAL_7B_V01, {"kv": 8, "head_dim": 128, "window": 4096, "kinds": {SLIDING}}),
        (QWEN2_7B, {"kv": 4, "head_dim": 128, "window": None, "kinds": {FULL}}),
        (GPT2, {"kv": 12, "head_dim": 64, "window": None, "kinds": {FULL}}),
        (BERT_BASE, {"kv": 12, "head_dim": 64, "window": None, "kinds": {FULL}}),
    ],
    ids=["llama", "mistral", "qwen2", "gpt2", "bert"],
)
def test_common_families(tmp_path, config, expected):
    cfg = ModelConfig.from_pretrained(write(tmp_path, config))
    assert cfg.num_key_value_heads == expected["kv"]
    assert cfg.head_dim == expected["head_dim"]
    assert cfg.sliding_window == expected["window"]
    assert set(cfg.layer_types) == expected["kinds"]
    assert len(cfg.layer_types) == cfg.num_hidden_layers
    assert cfg.model_type == config["model_type"]


def test_gpt2_names_are_mapped(tmp_path):
    cfg = ModelConfig.from_pretrained(write(tmp_path, GPT2))
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size) == (12, 12, 768)
    assert cfg.max_position_embeddings == 1024


def test_qwen2_sliding_layers_from_max_window_layers(tmp_path):
    config = dict(QWEN2_7B, use_sliding_window=True, sliding_window=4096, max_window_layers=20)
    cfg = ModelConfig.from_pretrained(write(tmp_path, config))
    assert cfg.layer_types == (FULL,) * 20 + (SLIDING,) * 8
    assert cfg.sliding_window == 4096


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": None}, "missing field 'num_attention_heads'"),
        ({"hidden_size": 100, "head_dim": None}, "hidden_size 100 is not a multiple"),
        ({"num_key_value_heads": 7}, "not a multiple of num_key_value_heads 7"),
        ({"num_hidden_layers": 0}, "'num_hidden_layers' must be a positive integer, got 0"),
        ({"num_hidden_layers": "24"}, "'num_hidden_layers' must be a positive integer"),
        ({"layer_types": ["sliding_attention"] * 23}, "layer_types has 23 entries"),
        ({"layer_types": ["chunked"] * 24}, "layer_types[0] is 'chunked'"),
        ({"sliding_window": None}, "need field 'sliding_window'"),
        ({"experts_per_token": 64}, "exceeds num_local_experts 32"),
        ({"rope_theta": -1}, "'rope_theta' must be positive"),
    ],
)
def test_bad_fields_name_field_and_file(tmp_path, change, message):
    config = {**GPT_OSS_20B_JSON, **change}
    config = {k: v for k, v in config.items() if v is not None}
    if "head_dim" not in change:
        config.setdefault("head_dim", 64)
    path = write(tmp_path, config)
    with pytest.raises(ConfigError, match=str(path).replace("/", ".")) as raised:
        ModelConfig.from_pretrained(path)
    assert message in str(raised.value)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        ModelConfig.from_pretrained(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="cannot read"):
        ModelConfig.from_pretrained(tmp_path)  # a directory without config.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelConfig.from_pretrained(bad)


def test_direct_construction_defaults_to_full_layers():
    cfg = ModelConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_size=64,
    )
    assert cfg.layer_types == (FULL, FULL)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=3,
            head_dim=16,
            hidden_size=64,
        )


def test_config_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)
