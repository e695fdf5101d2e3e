"""Random-weight Ouro directories in the Hugging Face layout (tests, golden values, benchmarks).

    python -m models.ouro_random DIR [--preset tiny|mid] [--seed 0] [--dtype float32|bfloat16] [--shards 3]

writes what a downloaded Ouro checkpoint holds, with seeded random weights:
config.json (`model_type: "ouro"`, `architectures`, an `auto_map` that
leanserve never follows), the weights as `--shards` safetensors shards named
like transformers' (`model-00001-of-00003.safetensors`) with
`model.safetensors.index.json`, a byte-level tokenizer.json (the 256 byte
symbols after `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` at ids 0-2, as in
Ouro's tokenizer; no merges, so it needs no training data), tokenizer_config.json
with a ChatML chat template (`CHAT_TEMPLATE`), and generation_config.json.

The weights depend only on the preset, the seed and the dtype (a CPU
`torch.Generator`, tensors drawn in `expected_hf_tensors` order), so the same
call writes the same tensors on any machine; the golden values of
tests/models/golden/ are the reference implementation's outputs on the tiny
preset with seed 0. Scales are chosen so the loops matter: norm weights
1 + 0.2 N(0, 1) (a mis-mapped norm changes the logits), matrices
N(0, 1/fan_in), embeddings N(0, 1), the exit gate's bias 0.5 N(0, 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vocab_size": 288,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "total_ut_steps": 4,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
    "mid": {
        "vocab_size": 8192,
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "max_position_embeddings": 4096,
        "total_ut_steps": 4,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
    },
}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' }}{%- endif -%}"
)
"""ChatML, as Ouro's chat models use it, with a default system turn when the conversation has none."""


def hf_config(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """The config.json of a preset, as a Hugging Face Ouro checkpoint writes it."""
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {', '.join(PRESETS)}")
    data: dict[str, Any] = {
        "architectures": ["OuroForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_ouro.OuroConfig",
            "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM",
        },
        "model_type": "ouro",
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": PRESETS[preset]["num_hidden_layers"],
        "rope_scaling": None,
        "early_exit_threshold": 1.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    data.update(PRESETS[preset])
    data.update(overrides)
    return data


def byte_tokenizer_json() -> str:
    """A byte-level tokenizer.json: ids 0-2 the special tokens, 3-258 the 256 byte symbols."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok.to_str()


def random_weights(data: dict[str, Any], seed: int = 0, dtype: str = "float32") -> dict[str, Any]:
    """Seeded random tensors (HF names, `expected_hf_tensors` order) for a config.json dict."""
    import torch

    from models.hf_ouro import config_from_hf, expected_hf_tensors

    config = config_from_hf(data, Path("config.json"))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in expected_hf_tensors(config).items():
        if (
            name.endswith("layernorm.weight")
            or name.endswith("layernorm_2.weight")
            or name == "model.norm.weight"
        ):
            t = 1.0 + 0.2 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        elif name == "model.early_exit_gate.bias":
            t = 0.5 * torch.randn(shape, generator=gen)
        else:  # (out, in) matrices and the gate's (1, d)
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        out[name] = t.to(getattr(torch, dtype)).contiguous()
    return out


def write_ouro_dir(
    model_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    shards: int = 3,
    **overrides: Any,
) -> Path:
    """Write a random-weight Ouro directory (see the module docstring); returns it.

    Args:
        model_dir: the directory (created; files in it are overwritten).
        preset: "tiny" or "mid" (`PRESETS`).
        seed: the weights' seed.
        dtype: "float32" or "bfloat16" (the tensors' dtype in the files).
        shards: safetensors shards (1 = a single `model.safetensors`, no index).
        overrides: config.json fields to change.
    """
    from safetensors.torch import save_file

    from models.hf_ouro import GENERATION_CONFIG_FILE, INDEX_FILE, TOKENIZER_CONFIG_FILE

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    data = hf_config(preset, torch_dtype=dtype, **overrides)
    tensors = random_weights(data, seed, dtype)
    (model_dir / "config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = -(-len(names) // shards)
        weight_map: dict[str, str] = {}
        for s in range(shards):
            part = names[s * per : (s + 1) * per]
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(model_dir / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (model_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (model_dir / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": data["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (model_dir / TOKENIZER_CONFIG_FILE).write_text(json.dumps(tok_config, indent=2) + "\n", encoding="utf-8")
    gen_config = {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 0, "do_sample": False}
    (model_dir / GENERATION_CONFIG_FILE).write_text(json.dumps(gen_config, indent=2) + "\n", encoding="utf-8")
    return model_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--shards", type=int, default=3)
    a = p.parse_args(argv)
    print(write_ouro_dir(a.model_dir, a.preset, a.seed, a.dtype, a.shards))


if __name__ == "__main__":
    main()
