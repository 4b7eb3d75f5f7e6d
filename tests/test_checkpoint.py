"""Quantization configs: ModelOpt and compressed-tensors files parse into one per-layer answer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantoracle.errors import CheckpointFormatError, SchemeError
from quantoracle.schemes.checkpoint import compressed_tensors, load_quant_config, modelopt
from quantoracle.schemes.checkpoint.config import QuantConfig
from quantoracle.schemes.scheme import W4A4_NVFP4, W4A16_NVFP4, W8A8_FP8

# FORMATS.md section 3, as ModelOpt 0.47 writes it.
MODELOPT_NVFP4 = {
    "producer": {"name": "modelopt", "version": "0.47.0"},
    "quantization": {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": None,
        "group_size": 16,
        "exclude_modules": [
            "lm_head",
            "model.embed_tokens",
            "model.layers.0.mlp.gate",
            "model.layers.1.self_attn*",
        ],
    },
}
MODELOPT_MIXED = {
    "producer": {"name": "modelopt", "version": "0.47.0"},
    "quantization": {
        "quant_algo": "MIXED_PRECISION",
        "kv_cache_quant_algo": None,
        "quantized_layers": {
            "model.layers.0.mlp.experts.0.gate_proj": {"quant_algo": "NVFP4", "group_size": 16},
            "model.layers.0.mlp.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
            "model.layers.0.mlp.experts.1.down_proj": {"quant_algo": "NVFP4", "group_size": 16},
            "model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"},
            "model.layers.0.self_attn.k_proj": {"quant_algo": "FP8"},
            "model.layers.0.self_attn.v_proj": {"quant_algo": "FP8"},
            "model.layers.1.self_attn.q_proj": {"quant_algo": "FP8"},
            "model.layers.1.self_attn.k_proj": {"quant_algo": "W4A16_NVFP4"},
        },
    },
}
MODELOPT_CONFIG_JSON = {
    "quant_method": "modelopt",
    "quant_algo": "NVFP4",
    "ignore": ["lm_head", "model.layers.0.mlp.gate"],
    "config_groups": {
        "group_0": {
            "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
            "input_activations": {
                "dynamic": False,
                "num_bits": 4,
                "type": "float",
                "group_size": 16,
            },
            "targets": ["Linear"],
        }
    },
    "producer": {"name": "modelopt", "version": "0.47.0"},
}
# FORMATS.md section 5, with the extra keys llm-compressor adds and without scale_dtype.
_CT_ARGS = {
    "num_bits": 4,
    "type": "float",
    "strategy": "tensor_group",
    "group_size": 16,
    "symmetric": True,
    "dynamic": False,
    "actorder": None,
    "block_structure": None,
    "observer": "minmax",
    "observer_kwargs": {},
    "zp_dtype": None,
}
CT_NVFP4 = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "format": "nvfp4-pack-quantized",
            "targets": ["Linear"],
            "weights": _CT_ARGS,
            "input_activations": {**_CT_ARGS, "dynamic": "local", "observer": "static_minmax"},
            "output_activations": None,
        }
    },
    "ignore": ["lm_head", "re:.*mlp.gate$"],
    "kv_cache_scheme": None,
    "sparsity_config": {},
    "version": "0.11.0",
}


def test_modelopt_nvfp4_answers_per_layer():
    config = modelopt.parse_hf_quant_config(MODELOPT_NVFP4, "hf_quant_config.json")
    assert config.scheme_for("model.layers.0.self_attn.q_proj") == W4A4_NVFP4
    assert config.scheme_for("model.layers.0.mlp.experts") == W4A4_NVFP4  # a MoE block prefix
    for unquantized in (
        "lm_head",
        "model.embed_tokens",
        "model.layers.0.mlp.gate",
        "model.layers.1.self_attn.o_proj",
    ):
        assert config.scheme_for(unquantized) is None
    # A prefix glob `a.b*` stops at the name: layer 10 is not layer 1.
    assert config.scheme_for("model.layers.10.self_attn.o_proj") == W4A4_NVFP4
    assert config.with_override("none").scheme_for("model.layers.0.self_attn.q_proj") == W4A16_NVFP4


@pytest.mark.parametrize(
    "algo, scheme", [("W4A16_NVFP4", W4A16_NVFP4), ("fp8", W8A8_FP8), ("NVFP4", W4A4_NVFP4)]
)
def test_modelopt_algos_map_to_schemes(algo, scheme):
    data = {"quantization": {**MODELOPT_NVFP4["quantization"], "quant_algo": algo}}
    assert (
        modelopt.parse_hf_quant_config(data, "x").scheme_for("model.layers.2.mlp.down_proj")
        == scheme
    )


def test_modelopt_mixed_precision_resolves_names_fused_layers_and_moe_prefixes():
    config = modelopt.parse_hf_quant_config(MODELOPT_MIXED, "hf_quant_config.json")
    assert config.scheme_for("model.layers.0.mlp.experts.0.gate_proj") == W4A4_NVFP4
    assert config.scheme_for("model.layers.0.self_attn.q_proj") == W8A8_FP8
    assert config.scheme_for("model.layers.0.self_attn.o_proj") is None  # absent: unquantized
    assert config.scheme_for("model.layers.0.self_attn.qkv_proj") == W8A8_FP8  # shards agree
    assert config.scheme_for("model.layers.0.mlp.experts") == W4A4_NVFP4  # entries under the prefix
    with pytest.raises(CheckpointFormatError, match="quantized differently"):
        config.scheme_for("model.layers.1.self_attn.qkv_proj")
    with pytest.raises(CheckpointFormatError, match="quantized differently"):
        config.scheme_for("model.layers.1.self_attn")


def test_modelopt_config_json_form():
    config = modelopt.parse_quantization_config(MODELOPT_CONFIG_JSON, "config.json")
    assert config.scheme_for("model.layers.0.mlp.experts.3.down_proj") == W4A4_NVFP4
    assert config.scheme_for("model.layers.0.mlp.gate") is None
    bad = {**MODELOPT_CONFIG_JSON, "config_groups": {"group_0": {"weights": {"group_size": 32}}}}
    with pytest.raises(CheckpointFormatError, match="group_size 32"):
        modelopt.parse_quantization_config(bad, "config.json")


def test_compressed_tensors_presets_and_unknown_keys():
    config = compressed_tensors.parse_quantization_config(CT_NVFP4, "config.json")
    assert config.scheme_for("model.layers.0.mlp.experts.0.gate_proj") == W4A4_NVFP4
    assert config.scheme_for("model.layers.0.mlp.gate") is None  # re: ignore
    assert config.scheme_for("lm_head") is None
    a16 = json.loads(json.dumps(CT_NVFP4))
    a16["config_groups"]["group_0"]["input_activations"] = None
    del a16["config_groups"]["group_0"]["weights"]["zp_dtype"]
    assert (
        compressed_tensors.parse_quantization_config(a16, "x").scheme_for("model.a.q_proj")
        == W4A16_NVFP4
    )


def test_compressed_tensors_targets_by_name_and_regex():
    data = json.loads(json.dumps(CT_NVFP4))
    group = data["config_groups"].pop("group_0")
    a16 = {**group, "input_activations": None}
    data["config_groups"] = {
        "group_0": {**group, "targets": ["re:.*self_attn.*"]},
        "group_1": {**a16, "targets": ["model.layers.0.mlp.down_proj"]},
    }
    config = compressed_tensors.parse_quantization_config(data, "x")
    assert config.scheme_for("model.layers.3.self_attn.q_proj") == W4A4_NVFP4
    assert config.scheme_for("model.layers.0.mlp.down_proj") == W4A16_NVFP4
    assert config.scheme_for("model.layers.0.mlp.up_proj") is None  # no group targets it


def _write(tmp_path, name, content):
    (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))


def test_load_quant_config_finds_the_config_as_vllm_does(tmp_path):
    hf_w4a16 = {"quantization": {**MODELOPT_NVFP4["quantization"], "quant_algo": "W4A16_NVFP4"}}
    _write(tmp_path, "hf_quant_config.json", hf_w4a16)
    _write(tmp_path, "config.json", {"model_type": "x"})
    config = load_quant_config(tmp_path)  # no quantization_config: hf_quant_config.json
    assert config.source.endswith("hf_quant_config.json")
    assert config.scheme_for("a.q_proj") == W4A16_NVFP4
    _write(tmp_path, "config.json", {"quantization_config": {"quant_library": "modelopt"}})
    assert load_quant_config(tmp_path).source.endswith("hf_quant_config.json")  # older exports
    # compressed-tensors' ModelOpt converter keeps a stale hf_quant_config.json: config.json wins
    _write(tmp_path, "config.json", {"model_type": "x", "quantization_config": CT_NVFP4})
    assert load_quant_config(tmp_path).format == "compressed-tensors"
    _write(tmp_path, "config.json", {"quantization_config": MODELOPT_CONFIG_JSON})
    config = load_quant_config(tmp_path, override_activation="none")
    assert config.format == "modelopt" and config.source.endswith(
        "config.json: quantization_config"
    )
    assert config.scheme_for("a.q_proj") == W4A16_NVFP4  # NVFP4 served weight-only


@pytest.mark.parametrize(
    "files, match",
    [
        ({"hf_quant_config.json": '{"quantization": {'}, "not valid JSON"),
        ({"hf_quant_config.json": {"quant_algo": "NVFP4"}}, '"quantization" object'),
        ({"hf_quant_config.json": {"quantization": {"quant_algo": "INT8_SQ"}}}, "INT8_SQ"),
        (
            {"hf_quant_config.json": {"quantization": {"quant_algo": "MIXED_PRECISION"}}},
            "quantized_layers",
        ),
        (
            {
                "hf_quant_config.json": {
                    "quantization": {"quant_algo": "NVFP4", "exclude_modules": "lm_head"}
                }
            },
            "list",
        ),
        ({"config.json": {"model_type": "llama"}}, "no quantization config"),
        ({"config.json": {"quantization_config": {"quant_method": "gptq"}}}, "gptq"),
        (
            {
                "config.json": {
                    "quantization_config": {
                        **CT_NVFP4,
                        "format": "float-quantized",
                        "config_groups": {
                            "g": {**CT_NVFP4["config_groups"]["group_0"], "format": None}
                        },
                    }
                }
            },
            "float-quantized",
        ),
        (
            {
                "config.json": {
                    "quantization_config": {
                        **CT_NVFP4,
                        "config_groups": {
                            "g": {
                                **CT_NVFP4["config_groups"]["group_0"],
                                "weights": {**_CT_ARGS, "type": "int"},
                            }
                        },
                    }
                }
            },
            "NVFP4 groups only",
        ),
        (
            {
                "config.json": {
                    "quantization_config": {
                        **CT_NVFP4,
                        "config_groups": {
                            "g": {**CT_NVFP4["config_groups"]["group_0"], "targets": ["Embedding"]}
                        },
                    }
                }
            },
            "module class",
        ),
    ],
)
def test_bad_configs_raise_checkpoint_format_error(tmp_path, files, match):
    for name, content in files.items():
        _write(tmp_path, name, content)
    with pytest.raises(CheckpointFormatError, match=match):
        load_quant_config(tmp_path)


def test_unknown_override_is_a_scheme_error():
    with pytest.raises(SchemeError, match="override_activation"):
        QuantConfig("modelopt", "x", W4A4_NVFP4, override_activation="fp8")


module_names = st.builds(
    "model.layers.{}.{}".format,
    st.integers(0, 12),
    st.sampled_from(
        [
            "self_attn.q_proj",
            "self_attn.o_proj",
            "mlp.down_proj",
            "mlp.experts.3.up_proj",
            "mlp.gate",
        ]
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from([W4A4_NVFP4, W4A16_NVFP4]),
    names=st.lists(module_names, min_size=1, max_size=12, unique=True),
    data=st.data(),
)
def test_every_config_the_writer_produces_parses_back(scheme, names, data):
    excluded = sorted(data.draw(st.sets(st.sampled_from(names))))
    parsed = [
        modelopt.parse_hf_quant_config(modelopt.hf_quant_config(scheme, excluded), "h"),
        modelopt.parse_quantization_config(modelopt.quantization_config(scheme, excluded), "c"),
        compressed_tensors.parse_quantization_config(
            compressed_tensors.quantization_config(scheme, excluded), "c"
        ),
    ]
    for config in parsed:
        for name in names:
            assert config.scheme_for(name) == (None if name in excluded else scheme)
