"""Model directories: `config.json`, `model.safetensors`, `tokenizer.json`.

Optional files that other parts of the project add: `profile.json` (measured
quality and latency per setting, from `leanserve eval`), `cost.json` (the
calibrated cost model), `README.md` (the model card) and ONNX graphs.

Loading never unpickles: weights come from safetensors only. Every way a
directory can be broken (a missing file, a truncated or corrupt safetensors
file, a missing, unexpected, mis-shaped or mis-typed tensor, a config that
does not validate, a tokenizer that does not load or does not fit the
config's vocabulary) raises `CheckpointError` naming the file and, where
there is one, the tensor or field.

`check_model_dir` finds all of that without loading any weights: the expected
tensors come from the model class built on the `meta` device and the file's
tensors from its safetensors header, so a server can refuse a broken
directory before it starts anything. torch is imported only where a function
needs it: a truncated or corrupt file, a bad config or tokenizer is reported
in a fraction of a second, a tensor that does not match in about two (most of
it torch's import).

Saving is atomic: everything is written into a temporary sibling directory
that is renamed over the target at the end, so an interrupted save never
leaves a half-written model directory behind.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from models.config import ConfigError, ModelConfig

if TYPE_CHECKING:  # torch and the model are imported lazily (see the module docstring)
    import torch

    from models.model import LeanLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PROFILE_FILE = "profile.json"
COST_FILE = "cost.json"

# safetensors dtype names and their sizes in bytes (the format's own spelling).
SAFETENSORS_DTYPES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_TORCH_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "float32": "F32",
    "int64": "I64",
    "float64": "F64",
}  # fmt: skip  (torch dtype name -> safetensors name)
# The safetensors reader refuses headers larger than this; a bigger length prefix means garbage.
_MAX_HEADER_BYTES = 100_000_000


class CheckpointError(ValueError):
    """A model directory is missing a file or holds a broken one (the message names both)."""


class TensorSpec(NamedTuple):
    """Name-independent description of one tensor: its shape and safetensors dtype (e.g. "F32")."""

    shape: tuple[int, ...]
    dtype: str


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (a model directory needs {path.name})")
    return path


# config.json `model_type` values of Hugging Face directories this project loads (models/hf_ouro.py);
# a LeanLM config.json has no model_type.
HF_MODEL_TYPES = ("ouro",)


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate `config.json` of a model directory.

    A LeanLM config, or a Hugging Face one whose `model_type` is in
    `HF_MODEL_TYPES` (an `OuroConfig`, models/hf_ouro.py).
    """
    path = _require(Path(model_dir) / CONFIG_FILE)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, not {type(data).__name__}")
    if "model_type" in data:
        return _hf_config(Path(model_dir), path, data)
    try:
        return ModelConfig.from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    except TypeError as e:  # an unknown key: the dataclass constructor names it
        raise CheckpointError(f"{path}: {e}") from e


def _hf_config(model_dir: Path, path: Path, data: dict[str, Any]) -> ModelConfig:
    """The config of a Hugging Face directory, by its `model_type` (named when unsupported)."""
    kind = data["model_type"]
    if kind not in HF_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type={kind!r} is not supported: leanserve loads its own model directories "
            f"(no model_type) and Hugging Face directories of model_type "
            f"{', '.join(map(repr, HF_MODEL_TYPES))}"
        )
    from models.hf_ouro import config_from_hf

    return config_from_hf(data, path, model_dir.resolve().name)


def is_hf_config(config: ModelConfig) -> bool:
    """The config came from a Hugging Face directory (loaded by models/hf_ouro.py, not as a LeanLM)."""
    return config.extra.get("source") == "huggingface"


# --- expected tensors, without weights -------------------------------------------------------------
_SHAPE_CHANGING = {
    "resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "t_", "transpose_",
    "swapdims_", "swapaxes_",
}  # fmt: skip


def _no_meta_init() -> Any:
    """A torch function mode that skips in-place initialisers (`normal_`, `zero_`, ...) on meta
    tensors: they hold no data, and torch's meta kernels for the random ones import
    torch._dynamo (~1.5 s on first use)."""
    import torch
    from torch.overrides import TorchFunctionMode

    class NoMetaInit(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
        ) -> Any:
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            target = args[0] if args else next(iter(kwargs.values()), None)
            if (
                name.endswith("_")
                and not name.startswith("_")
                and name not in _SHAPE_CHANGING
                and isinstance(target, torch.Tensor)
                and target.is_meta
            ):
                return target
            return func(*args, **kwargs)

    return NoMetaInit()


def expected_tensors(config: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor a checkpoint of `config` must hold: the model's state dict built on the
    `meta` device (shapes and dtypes only; nothing is allocated or initialised)."""
    import torch

    from models.model import LeanLM

    with torch.device("meta"), _no_meta_init():
        model = LeanLM(config)
    return {name: _spec(t) for name, t in model.state_dict().items()}


def _spec(t: torch.Tensor) -> TensorSpec:
    name = str(t.dtype).removeprefix("torch.")
    return TensorSpec(tuple(t.shape), _TORCH_DTYPES.get(name, name))


# --- safetensors header ----------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n} bytes" if n < 10_000 else f"{n / 1000:,.0f} kB"


def read_safetensors_header(path: str | Path) -> dict[str, TensorSpec]:
    """The tensors a safetensors file declares, after checking the file's structure.

    Reads only the header (and the file size): the length prefix, the JSON
    header, each entry's dtype, shape and byte range, that the ranges tile the
    data area exactly, and that the file holds all of it.

    Raises:
        CheckpointError: missing, truncated or corrupt file (named, with what is wrong).
    """
    path = _require(Path(path))
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: not a safetensors file (header length prefix {n} is implausible)")
        if n > size - 8:
            raise CheckpointError(
                f"{path} is truncated: header says it is {_size(n)} long, file has {_size(size - 8)} after it"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    specs: dict[str, TensorSpec] = {}
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        spec, begin, end = _entry(path, name, entry)
        specs[name] = spec
        ranges.append((begin, end, name))
    expected_begin = 0
    for begin, end, name in sorted(ranges):
        if begin != expected_begin:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {name!r} starts at byte {begin}, "
                f"expected {expected_begin} (data ranges must tile the data area)"
            )
        expected_begin = end
    have = size - 8 - n
    if have < expected_begin:
        raise CheckpointError(
            f"{path} is truncated: header says {_size(expected_begin)} of data, file has {_size(have)}"
        )
    if have > expected_begin:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: {have - expected_begin} bytes after the last tensor's data"
        )
    return specs


def _entry(path: Path, name: str, entry: Any) -> tuple[TensorSpec, int, int]:
    """One header entry -> (spec, begin, end), checked for consistency."""
    where = f"{path}: corrupt safetensors header: tensor {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{where} has invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{where} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(
            f"{where}: {dtype} {tuple(shape)} needs {nbytes} bytes, "
            f"its data_offsets span {offsets[1] - offsets[0]}"
        )
    return TensorSpec(tuple(shape), dtype), offsets[0], offsets[1]


def check_tensors(
    path: str | Path, expected: dict[str, TensorSpec], found: dict[str, TensorSpec] | None = None
) -> None:
    """Check a safetensors file's tensors against the tensors a model expects.

    Args:
        path: the file.
        expected: name -> spec the model needs (`expected_tensors`).
        found: the file's header if already read (`read_safetensors_header`).

    Raises:
        CheckpointError: a structural problem (see `read_safetensors_header`), or the first
            missing, unexpected, mis-shaped or mis-typed tensor, named.
    """
    path = Path(path)
    if found is None:
        found = read_safetensors_header(path)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r} (does config.json match?)")
    for name, want in expected.items():
        got = found[name]
        if got.shape != want.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {got.shape}, config.json implies {want.shape}"
            )
        if got.dtype != want.dtype:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {got.dtype}, the model expects {want.dtype}"
            )


def load_state(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read tensors from a safetensors file, after checking them (`check_tensors`) against `expected`."""
    from safetensors import SafetensorError, safe_open

    check_tensors(path, {name: _spec(t) for name, t in expected.items()})
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in expected}
    except SafetensorError as e:  # the header checked out, the data did not
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from e


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> LeanLM:
    """Build a LeanLM from a model directory, in eval mode (an `OuroLM` from a Hugging Face Ouro
    directory: the same `forward` and trunk loop, models/ouro.py)."""
    from models.model import LeanLM

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found")
    config = load_config(model_dir)
    if is_hf_config(config):
        from models.hf_ouro import load_ouro

        return load_ouro(model_dir, device)  # type: ignore[return-value]  # an OuroLM: same forward
    model = LeanLM(config)
    state = load_state(model_dir / WEIGHTS_FILE, model.state_dict())
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def generation_stop_ids(model_dir: str | Path, vocab_size: int) -> tuple[int, ...]:
    """The end-of-sequence ids of a Hugging Face `generation_config.json` (`eos_token_id`: an
    id or a list of ids), () when the file or the field is absent.

    Raises:
        CheckpointError: a value that is not a token id of this vocabulary (named).
    """
    data = read_json(model_dir, "generation_config.json") or {}
    value = data.get("eos_token_id")
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
            raise CheckpointError(
                f"{Path(model_dir) / 'generation_config.json'}: eos_token_id={value!r}: "
                f"must be a token id in [0, {vocab_size}) or a list of them"
            )
    return tuple(dict.fromkeys(ids))


def read_json(model_dir: str | Path, name: str) -> dict[str, Any] | None:
    """An optional JSON object file of the model directory, or None if absent."""
    path = Path(model_dir) / name
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


# --- the whole directory ---------------------------------------------------------------------------
def check_tokenizer(model_dir: str | Path, config: ModelConfig) -> None:
    """`tokenizer.json` loads and every id it can produce has an embedding row (< vocab_size).

    Raises:
        CheckpointError: missing, unloadable, or a vocabulary larger than the config's.
    """
    from models.tokenizer import load_tokenizer  # tokenizers: only needed here

    path = _require(Path(model_dir) / TOKENIZER_FILE)
    try:
        tok = load_tokenizer(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}: does not load ({e})") from e
    ids = tok.get_vocab(with_added_tokens=True).values()
    top = max(ids, default=-1)
    if top >= config.vocab_size:
        raise CheckpointError(
            f"{path}: vocabulary has ids up to {top} ({len(ids)} tokens), "
            f"config.json vocab_size={config.vocab_size} (the model has no embedding for ids >= it)"
        )


def check_onnx(model_dir: str | Path, config: ModelConfig) -> None:
    """`onnx/manifest.json` parses, matches `config.json`, and each graph it lists exists and
    parses as an ONNX model (external weights are not read).

    Raises:
        CheckpointError: the first problem, naming the file.
    """
    from models.export import MANIFEST_FILE, MANIFEST_FORMAT, ONNX_DIR, config_hash

    onnx_dir = Path(model_dir) / ONNX_DIR
    manifest = read_json(onnx_dir, MANIFEST_FILE)
    path = onnx_dir / MANIFEST_FILE
    if manifest is None:
        raise CheckpointError(f"{path}: file not found (run `leanserve export {model_dir}`)")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: format={manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    if manifest.get("config_hash") != config_hash(config):
        raise CheckpointError(f"{path}: exported for a different config.json; re-run `leanserve export`")
    graphs = manifest.get("graphs")
    if not isinstance(graphs, dict) or not graphs:
        raise CheckpointError(f"{path}: no graphs listed")
    import onnx

    for name, graph in graphs.items():
        file = Path(model_dir) / str((graph or {}).get("file", ""))
        _require(file)
        data = (graph or {}).get("data")
        if data:
            _require(Path(model_dir) / data)
        try:
            onnx.load(str(file), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise CheckpointError(f"{file}: not a valid ONNX graph {name!r} ({e})") from e


def check_model_dir(model_dir: str | Path, require_onnx: bool = False) -> ModelConfig:
    """Check a model directory without loading its weights; return its config.

    Checks `config.json` (loads and validates), `model.safetensors` (structure
    and every tensor's name, shape and dtype against the model `config.json`
    describes), `tokenizer.json` (loads; its ids fit `vocab_size`), and the
    optional files where present: `profile.json` and `cost.json` (JSON
    objects) and `onnx/` (`check_onnx`; required with `require_onnx`).

    Raises:
        CheckpointError: the first problem found, naming the file and the tensor or field.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory not found")
    config = load_config(model_dir)
    if is_hf_config(config):
        from models.hf_ouro import check_ouro_dir

        if require_onnx:
            raise CheckpointError(
                f"{model_dir}: a Hugging Face Ouro directory is served by backend=torch (no ONNX export)"
            )
        return check_ouro_dir(model_dir)
    found = read_safetensors_header(model_dir / WEIGHTS_FILE)
    check_tokenizer(model_dir, config)
    for name in (PROFILE_FILE, COST_FILE):
        read_json(model_dir, name)
    # Only now torch (about 1.5 s to import): everything above is reported without it.
    check_tensors(model_dir / WEIGHTS_FILE, expected_tensors(config), found)
    from models.export import ONNX_DIR

    if require_onnx or (model_dir / ONNX_DIR).exists():
        check_onnx(model_dir, config)
    return config


def _make_temp_dir(model_dir: Path) -> Path:
    """A fresh hidden sibling of `model_dir`, made with os.mkdir's mode (0777 less the umask),
    not tempfile.mkdtemp's 0700, so the renamed directory is as readable as any other."""
    for _ in range(100):
        path = model_dir.parent / f".{model_dir.name}.{secrets.token_hex(6)}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"{model_dir.parent}: no free temporary name for saving {model_dir.name}")


def save_model(
    model: LeanLM,
    model_dir: str | Path,
    tokenizer_json: str | None = None,
    extra_files: dict[str, str | bytes] | None = None,
    keep_existing: bool = True,
) -> Path:
    """Write a model directory atomically.

    Args:
        model: the model; its config is written as `config.json`.
        model_dir: target directory (replaced if it exists).
        tokenizer_json: serialised HF tokenizer (`Tokenizer.to_str()`).
        extra_files: more files to write, name -> content.
        keep_existing: carry over files of an existing directory that this
            save does not write (e.g. `profile.json`, the model card).

    Returns:
        The model directory.
    """
    from safetensors.torch import save_file

    model_dir = Path(model_dir)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(model_dir)
    try:
        written = {CONFIG_FILE, WEIGHTS_FILE}
        (tmp / CONFIG_FILE).write_text(model.config.to_json() + "\n", encoding="utf-8")
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        # safetensors creates its file 0600; give it the mode a plain write got (0666 less the umask).
        os.chmod(tmp / WEIGHTS_FILE, (tmp / CONFIG_FILE).stat().st_mode & 0o777)
        if tokenizer_json is not None:
            (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
            written.add(TOKENIZER_FILE)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as fh:
                fh.write(content)
            written.add(name)
        if keep_existing and model_dir.is_dir():
            for old in model_dir.iterdir():
                if old.name not in written and old.is_file():
                    shutil.copy2(old, tmp / old.name)
        # Swap in: rename the old directory aside, move the new one in, delete the old.
        old_aside = None
        if model_dir.exists():
            old_aside = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.old.", dir=model_dir.parent))
            os.rename(model_dir, old_aside / "d")
        os.rename(tmp, model_dir)
        if old_aside is not None:
            shutil.rmtree(old_aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model_dir
