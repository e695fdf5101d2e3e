"""Ouro checkpoints from their Hugging Face directories: config, sharded safetensors, checks, mapping.

A Hugging Face Ouro directory (`ByteDance/Ouro-1.4B` and friends) holds

    config.json                    model_type "ouro", the architecture (read here)
    model.safetensors              the weights, or shards listed by
    model.safetensors.index.json   {"weight_map": {tensor name: shard file}}
    tokenizer.json                 HF tokenizers (models/tokenizer.py loads it)
    tokenizer_config.json          special tokens and the chat template (runtime/chat_template.py)
    generation_config.json         sampling defaults (checked to be a JSON object; not applied)

Nothing here runs code from the directory (no `trust_remote_code`), unpickles
or reaches the network: the config is read as JSON and mapped onto
`models.ouro.OuroConfig`, the weights are read with safetensors and mapped
onto `models.ouro.OuroLM` (q/k/v and gate/up concatenated into the fused
projections). `models.checkpoint` dispatches here on config.json's
`model_type`, so `leanserve serve DIR` and `Engine.from_model_dir` take an
Ouro directory as they take a LeanLM one.

What is served is what the reference modeling code computes for a loop count
(`exit_at_step = steps - 1`): the architecture in models/ouro.py. A
configuration it does not implement fails at load with `CheckpointError`
naming config.json, the field and the value: sliding-window layers, rope
scaling other than the default, partial rotary, attention or MLP biases, an
activation other than silu, an exit threshold below 1 (the reference would
then pick each token's loop by the gate by default, which serving per
request loop count does not do). A broken directory (missing file or shard,
an index naming a shard that is not there, a tensor missing, unexpected,
mis-shaped or not floating point) fails naming the file and the tensor.

Shape legend: d | hidden size, V | vocabulary, L | layers per loop,
nh, kv | query / key-value heads, hs | head size, F | MLP width.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    check_tokenizer,
    read_json,
    read_safetensors_header,
)
from models.config import ConfigError
from models.ouro import OuroConfig, ouro_config

if TYPE_CHECKING:
    import torch

    from models.ouro import OuroLM

MODEL_TYPE = "ouro"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_FLOAT_DTYPES = ("F32", "BF16", "F16")
_IGNORED_TENSORS = ("model.rotary_emb.inv_freq",)  # a buffer some exports include; recomputed here


def _field(data: dict[str, Any], name: str, default: Any = None, required: bool = False) -> Any:
    if name not in data:
        if required:
            raise KeyError(name)
        return default
    return data[name]


def _int(data: dict[str, Any], name: str, low: int, default: Any = None) -> int:
    value = _field(data, name, default, required=default is None)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(name, value, f"must be an integer >= {low}")
    return value


def _rope_theta(data: dict[str, Any]) -> float:
    """rope_theta from `rope_theta` (transformers 4) or `rope_parameters` (5); checks the rope type."""
    for name in ("rope_scaling", "rope_parameters"):
        rope = data.get(name)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise ConfigError(name, rope, "must be an object or null")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"{name}.rope_type", kind, "only the default rotary embedding is implemented")
        extra = sorted(set(rope) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise ConfigError(f"{name}.{extra[0]}", rope[extra[0]], "not implemented (default RoPE only)")
    theta = data.get("rope_theta")
    params = data.get("rope_parameters")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    theta = 10000.0 if theta is None else theta
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
        raise ConfigError("rope_theta", theta, "must be a number > 0")
    return float(theta)


def _check_unsupported(data: dict[str, Any]) -> None:
    """Raise ConfigError naming the first field whose value this implementation does not serve."""
    if data.get("use_sliding_window"):
        value = data["use_sliding_window"]
        raise ConfigError("use_sliding_window", value, "sliding-window attention is not implemented")
    layer_types = data.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list):
            raise ConfigError("layer_types", layer_types, "must be a list")
        for i, kind in enumerate(layer_types):
            if kind != "full_attention":
                raise ConfigError(f"layer_types[{i}]", kind, "only 'full_attention' layers are implemented")
        if len(layer_types) != data.get("num_hidden_layers"):
            raise ConfigError("layer_types", len(layer_types), "must list one type per num_hidden_layers")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError("hidden_act", act, "only 'silu' (SwiGLU) is implemented")
    for name in ("attention_bias", "mlp_bias"):
        if data.get(name):
            raise ConfigError(name, data[name], "biases in attention / MLP projections are not implemented")
    partial = data.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ConfigError("partial_rotary_factor", partial, "only full rotary embeddings (1.0) are served")
    threshold = data.get("early_exit_threshold")
    if threshold is not None and (not isinstance(threshold, (int, float)) or threshold < 1.0):
        raise ConfigError(
            "early_exit_threshold",
            threshold,
            "must be null or >= 1.0: with a lower threshold the reference exits each token by the gate "
            "by default, and this server runs the loop count of each request's `steps`",
        )


def config_from_hf(data: dict[str, Any], path: Path, name: str = "ouro") -> OuroConfig:
    """An `OuroConfig` from a Hugging Face Ouro `config.json`.

    Args:
        data: the parsed config.json.
        path: its path (for messages).
        name: the model's name (the directory's).

    Raises:
        CheckpointError: naming `path`, the field and its value (unknown model_type,
            a missing or invalid field, an unsupported configuration).
    """
    try:
        if data.get("model_type") != MODEL_TYPE:
            raise ConfigError("model_type", data.get("model_type"), f"must be {MODEL_TYPE!r} here")
        _check_unsupported(data)
        d = _int(data, "hidden_size", 1)
        nh = _int(data, "num_attention_heads", 1)
        kv = _int(data, "num_key_value_heads", 1, default=nh)
        if nh % kv:
            raise ConfigError("num_key_value_heads", kv, f"must divide num_attention_heads={nh}")
        hs = data.get("head_dim")
        if hs is None:
            if d % nh:
                allowed = f"must divide hidden_size={d} (no head_dim given)"
                raise ConfigError("num_attention_heads", nh, allowed)
            hs = d // nh
        hs = _int({"head_dim": hs}, "head_dim", 2)
        loops = _int(data, "total_ut_steps", 1, default=4)
        exit_step = data.get("early_exit_step")
        default_loops = loops
        if exit_step is not None:
            if not isinstance(exit_step, int) or not 0 <= exit_step < loops:
                allowed = f"must be null or an integer in [0, {loops - 1}]"
                raise ConfigError("early_exit_step", exit_step, allowed)
            default_loops = exit_step + 1  # the reference's default exit
        tie = data.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ConfigError("tie_word_embeddings", tie, "must be true or false")
        eps = data.get("rms_norm_eps", 1e-6)
        if not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError("rms_norm_eps", eps, "must be a number > 0")
        return ouro_config(
            name=name,
            vocab_size=_int(data, "vocab_size", 2),
            context_length=_int(data, "max_position_embeddings", 1),
            d_model=d,
            n_heads=nh,
            n_kv_heads=kv,
            attn_head_dim=hs,
            d_ff=_int(data, "intermediate_size", 1),
            loop_layers=_int(data, "num_hidden_layers", 1),
            max_steps=loops,
            default_steps=default_loops,
            norm_eps=float(eps),
            tie_embeddings=tie,
            rope_theta=_rope_theta(data),
            extra={"source": "huggingface", "model_type": MODEL_TYPE},
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: field {e.args[0]!r} is missing (needed for an Ouro model)") from e
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e


def _read_config_json(model_dir: Path) -> dict[str, Any]:
    data = read_json(model_dir, CONFIG_FILE)
    if data is None:
        raise CheckpointError(f"{model_dir / CONFIG_FILE}: file not found (a model directory needs it)")
    return data


def load_ouro_config(model_dir: str | Path) -> OuroConfig:
    """Read an Ouro directory's config.json (see `config_from_hf`)."""
    model_dir = Path(model_dir)
    return config_from_hf(_read_config_json(model_dir), model_dir / CONFIG_FILE, model_dir.resolve().name)


# --- expected tensors and the shards ---------------------------------------------------------------
def expected_hf_tensors(config: OuroConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an Ouro checkpoint of `config` holds, with its shape (HF names)."""
    d, V, F = config.d_model, config.vocab_size, config.d_ff
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, d)}
    for i in range(config.loop_layers):
        p = f"model.layers.{i}."
        out.update(
            {
                p + "self_attn.q_proj.weight": (q, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, q),
                p + "mlp.gate_proj.weight": (F, d),
                p + "mlp.up_proj.weight": (F, d),
                p + "mlp.down_proj.weight": (d, F),
                p + "input_layernorm.weight": (d,),
                p + "input_layernorm_2.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
                p + "post_attention_layernorm_2.weight": (d,),
            }
        )
    out["model.norm.weight"] = (d,)
    out["model.early_exit_gate.weight"] = (1, d)
    out["model.early_exit_gate.bias"] = (1,)
    if not config.tie_embeddings:
        out["lm_head.weight"] = (V, d)
    return out


def weight_map(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it: from the index, or the single file.

    Raises:
        CheckpointError: no weights, an index that is not a {"weight_map": {name: file}}
            object, or a shard it names that is not there (the index, the tensor, the file).
    """
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if not index_path.is_file():
        single = model_dir / WEIGHTS_FILE
        if not single.is_file():
            raise CheckpointError(f"{model_dir}: neither {INDEX_FILE} nor {WEIGHTS_FILE} found")
        return {name: single for name in read_safetensors_header(single)}
    index = read_json(model_dir, INDEX_FILE)
    wm = None if index is None else index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: needs a non-empty 'weight_map' object (tensor -> shard file)")
    out: dict[str, Path] = {}
    for name, shard in wm.items():
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index_path}: weight_map[{name!r}]={shard!r} is not a file name")
        path = model_dir / shard
        if not path.is_file():
            raise CheckpointError(
                f"{index_path}: weight_map[{name!r}] names shard {shard!r}, which is missing ({path})"
            )
        out[name] = path
    return out


def check_weights(model_dir: str | Path, config: OuroConfig) -> dict[str, Path]:
    """Check every shard's header and every tensor's name, shape and dtype; return the weight map.

    Raises:
        CheckpointError: naming the file (shard or index) and the tensor.
    """
    wm = weight_map(model_dir)
    headers = {path: read_safetensors_header(path) for path in sorted(set(wm.values()))}
    expected = expected_hf_tensors(config)
    index = Path(model_dir) / (INDEX_FILE if (Path(model_dir) / INDEX_FILE).is_file() else WEIGHTS_FILE)
    for path, header in headers.items():
        for name in header:
            if (
                name not in expected
                and name not in _IGNORED_TENSORS
                and not (config.tie_embeddings and name == "lm_head.weight")
            ):
                raise CheckpointError(f"{path}: unexpected tensor {name!r} (does config.json match?)")
            if wm.get(name, path) != path:
                raise CheckpointError(f"{path}: holds {name!r}, which {INDEX_FILE} places in {wm[name].name}")
    for name, shape in expected.items():
        path = wm.get(name)
        if path is None:
            raise CheckpointError(f"{index}: tensor {name!r} is missing (config.json implies {shape})")
        spec = headers[path].get(name)
        if spec is None:
            raise CheckpointError(f"{path}: tensor {name!r} is missing ({INDEX_FILE} places it here)")
        if spec.shape != shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {spec.shape}, config.json implies {shape}"
            )
        if spec.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {spec.dtype}, expected one of {_FLOAT_DTYPES}"
            )
    return wm


def check_ouro_dir(model_dir: str | Path) -> OuroConfig:
    """Check an Ouro directory without loading weights: config.json, the index and every shard's
    tensors, tokenizer.json (loads, ids fit vocab_size), and tokenizer_config.json /
    generation_config.json where present (JSON objects).

    Raises:
        CheckpointError: the first problem, naming the file and the field or tensor.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found")
    config = load_ouro_config(model_dir)
    check_weights(model_dir, config)
    if not (model_dir / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{model_dir / TOKENIZER_FILE}: file not found (a model directory needs it)")
    check_tokenizer(model_dir, config)
    for name in (TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE):
        read_json(model_dir, name)
    return config


# --- loading ---------------------------------------------------------------------------------------
def hf_to_model_state(hf: dict[str, torch.Tensor], config: OuroConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (HF names) as `OuroLM`'s state dict (fused q|k|v and gate|up)."""
    import torch

    state = {"embed_tokens.weight": hf["model.embed_tokens.weight"], "norm": hf["model.norm.weight"]}
    for i in range(config.loop_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        q = f"layers.{i}."
        qkv = [hf[a + "q_proj.weight"], hf[a + "k_proj.weight"], hf[a + "v_proj.weight"]]
        state[q + "qkv.weight"] = torch.cat(qkv)
        state[q + "o.weight"] = hf[a + "o_proj.weight"]
        state[q + "gate_up.weight"] = torch.cat([hf[m + "gate_proj.weight"], hf[m + "up_proj.weight"]])
        state[q + "down.weight"] = hf[m + "down_proj.weight"]
        state[q + "attn_in"] = hf[p + "input_layernorm.weight"]
        state[q + "attn_out"] = hf[p + "input_layernorm_2.weight"]
        state[q + "mlp_in"] = hf[p + "post_attention_layernorm.weight"]
        state[q + "mlp_out"] = hf[p + "post_attention_layernorm_2.weight"]
    state["exit_gate.weight"] = hf["model.early_exit_gate.weight"]
    state["exit_gate.bias"] = hf["model.early_exit_gate.bias"]
    if not config.tie_embeddings:
        state["lm_head.weight"] = hf["lm_head.weight"]
    return state


def load_ouro(model_dir: str | Path, device: str | torch.device = "cpu") -> OuroLM:
    """An `OuroLM` (float32, eval mode) from a Hugging Face Ouro directory, after `check_weights`.

    Raises:
        CheckpointError: see `check_weights` and `config_from_hf`; a shard whose data does not read.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    from models.ouro import OuroLM

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found")
    config = load_ouro_config(model_dir)
    wm = check_weights(model_dir, config)
    wanted = expected_hf_tensors(config)
    hf: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(wm[name], []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    hf[name] = f.get_tensor(name).to(torch.float32)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
        except OSError as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e
    with torch.device("meta"):
        model = OuroLM(config)
    model.load_state_dict(hf_to_model_state(hf, config), strict=True, assign=True)
    return model.to(device).eval()


def is_ouro_config(data: dict[str, Any]) -> bool:
    """config.json names Hugging Face's model_type "ouro"."""
    return data.get("model_type") == MODEL_TYPE
