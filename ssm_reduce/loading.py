"""Load and save Mamba / Mamba-2 checkpoints in either format.

``mamba_ssm`` checkpoints (``state-spaces/mamba*``: ``config.json`` with ``d_model``, ``n_layer``,
``ssm_cfg`` ... plus ``pytorch_model.bin`` or ``model.safetensors``) become the equivalent transformers
``Mamba2ForCausalLM`` / ``MambaForCausalLM``, so they run wherever transformers runs, CPU included.
Hugging Face checkpoints load as they are. Pickled weights are read with ``weights_only=True``:
anything but tensors is refused.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Optional, Union

import torch

from .embedded import resolve_model_name

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# mamba_ssm Mamba2 / Mamba defaults (mamba_ssm.modules.mamba2.Mamba2, mamba_simple.Mamba)
MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, bias=False,
                       conv_bias=True, dt_min=0.001, dt_max=0.1, dt_limit=(0.0, float("inf")), rmsnorm=True,
                       norm_before_gate=False, D_has_hdim=False, d_ssm=None)
MAMBA1_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1, bias=False,
                       conv_bias=True)
# Layer options that only shape the initialisation or pick a kernel: accepted, and nothing to convert.
MAMBA2_INIT_ONLY = ("conv_init", "A_init_range", "dt_init_floor", "use_mem_eff_path", "sequence_parallel")
MAMBA1_INIT_ONLY = ("dt_init", "dt_scale", "dt_init_floor", "use_fast_path")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: names the file and, where it applies, the key."""


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device``; ``ValueError`` naming it if it is none, or is CUDA where there is none."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available here")
    return resolved


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs a config.json")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def is_mamba_ssm_config(config: dict) -> bool:
    return "model_type" not in config and bool({"d_model", "n_layer", "ssm_cfg"} & set(config))


def _field(config: dict, key: str, path: Path, kind=int):
    if key not in config:
        raise CheckpointError(f"{path}: missing key {key!r}")
    value = config[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise CheckpointError(f"{path}: key {key!r} must be a positive integer, got {value!r}")
    return value


def _check_types(ssm_cfg: dict, defaults: dict, path: Path) -> None:
    """Every ``ssm_cfg`` value of the kind its default has (an integer, a number, a flag, a pair)."""
    for key, value in ssm_cfg.items():
        default = defaults[key]
        if default is None or (key == "dt_rank" and value == "auto"):
            ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)
            kind = "a positive integer or null" if default is None else "a positive integer or 'auto'"
        elif isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int) or key == "dt_rank":
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            kind = "a positive integer" if key != "dt_rank" else "a positive integer or 'auto'"
        elif isinstance(default, float):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:  # a (low, high) pair
            ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            kind = "a pair of numbers"
        if not ok:
            raise CheckpointError(f"{path}: ssm_cfg key {key!r} must be {kind}, got {value!r}")


def hf_config_from_mamba_ssm(config: dict, path: Path):
    """The transformers config equivalent to a mamba_ssm ``config.json`` (FACTS: n_groups and tied
    embeddings must be set explicitly, transformers defaults them differently)."""
    d_model = _field(config, "d_model", path)
    n_layer = _field(config, "n_layer", path)
    vocab = _field(config, "vocab_size", path)
    multiple = config.get("pad_vocab_size_multiple", 8)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0:
        raise CheckpointError(f"{path}: key 'pad_vocab_size_multiple' must be a positive integer, got {multiple!r}")
    if vocab % multiple:
        vocab += multiple - vocab % multiple
    ssm_cfg = config.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        raise CheckpointError(f"{path}: key 'ssm_cfg' must be an object of layer options, got {ssm_cfg!r}")
    ssm_cfg = dict(ssm_cfg)
    if config.get("attn_layer_idx") or config.get("d_intermediate", 0):
        raise CheckpointError(
            f"{path}: attention layers (attn_layer_idx) or MLP blocks (d_intermediate) have no transformers "
            "Mamba equivalent; load this checkpoint with host='mamba_ssm'"
        )
    if not config.get("rms_norm", True):
        raise CheckpointError(f"{path}: rms_norm=false (LayerNorm blocks) has no transformers Mamba equivalent")
    layer = ssm_cfg.pop("layer", "Mamba1")
    common = dict(
        hidden_size=d_model, num_hidden_layers=n_layer, vocab_size=vocab, layer_norm_epsilon=1e-5,
        residual_in_fp32=config.get("residual_in_fp32", True), tie_word_embeddings=config.get("tie_embeddings", True),
    )
    if layer == "Mamba2":
        for key in MAMBA2_INIT_ONLY:
            ssm_cfg.pop(key, None)
        unknown = set(ssm_cfg) - set(MAMBA2_DEFAULTS)
        if unknown:
            raise CheckpointError(f"{path}: ssm_cfg keys {sorted(unknown)} are not supported for Mamba2 layers")
        _check_types(ssm_cfg, MAMBA2_DEFAULTS, path)
        c = {**MAMBA2_DEFAULTS, **ssm_cfg}
        d_inner = c["expand"] * d_model
        if c["d_ssm"] not in (None, d_inner) or c["D_has_hdim"] or not c["rmsnorm"] or c["norm_before_gate"]:
            raise CheckpointError(
                f"{path}: ssm_cfg d_ssm / D_has_hdim / rmsnorm=false / norm_before_gate=true have no transformers equivalent"
            )
        if d_inner % c["headdim"]:
            raise CheckpointError(f"{path}: expand * d_model = {d_inner} is not a multiple of headdim {c['headdim']}")
        from transformers import Mamba2Config

        return Mamba2Config(
            **common, state_size=c["d_state"], conv_kernel=c["d_conv"], expand=c["expand"], head_dim=c["headdim"],
            num_heads=d_inner // c["headdim"], n_groups=c["ngroups"], chunk_size=c["chunk_size"],
            use_bias=c["bias"], use_conv_bias=c["conv_bias"], time_step_min=c["dt_min"], time_step_max=c["dt_max"],
            time_step_limit=tuple(c["dt_limit"]),
        )
    if layer not in ("Mamba1", "Mamba"):
        raise CheckpointError(f"{path}: ssm_cfg layer {layer!r} is not supported; expected Mamba1 or Mamba2")
    for key in MAMBA1_INIT_ONLY:
        ssm_cfg.pop(key, None)
    unknown = set(ssm_cfg) - set(MAMBA1_DEFAULTS)
    if unknown:
        raise CheckpointError(f"{path}: ssm_cfg keys {sorted(unknown)} are not supported for Mamba layers")
    _check_types(ssm_cfg, MAMBA1_DEFAULTS, path)
    c = {**MAMBA1_DEFAULTS, **ssm_cfg}
    from transformers import MambaConfig

    return MambaConfig(
        **common, state_size=c["d_state"], conv_kernel=c["d_conv"], expand=c["expand"],
        time_step_rank=math.ceil(d_model / 16) if c["dt_rank"] == "auto" else c["dt_rank"],
        use_bias=c["bias"], use_conv_bias=c["conv_bias"], time_step_min=c["dt_min"], time_step_max=c["dt_max"],
    )


def mamba_ssm_config_from_hf(config) -> dict:
    """The mamba_ssm ``config.json`` of a transformers Mamba / Mamba-2 config (only fields mamba_ssm's
    ``MambaConfig`` knows, so ``MambaLMHeadModel.from_pretrained`` reads it too)."""
    if abs(config.layer_norm_epsilon - 1e-5) > 1e-12:
        raise ValueError(f"mamba_ssm checkpoints fix the norm epsilon at 1e-5; this model uses {config.layer_norm_epsilon}")
    out = {"d_model": config.hidden_size, "d_intermediate": 0, "n_layer": config.num_hidden_layers,
           "vocab_size": config.vocab_size, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
           "residual_in_fp32": config.residual_in_fp32, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
           "tie_embeddings": config.tie_word_embeddings}
    if type(config).__name__ == "Mamba2Config":
        out["ssm_cfg"] = {"layer": "Mamba2", "d_state": config.state_size, "d_conv": config.conv_kernel,
                          "expand": config.expand, "headdim": config.head_dim, "ngroups": config.n_groups,
                          "chunk_size": config.chunk_size, "bias": config.use_bias, "conv_bias": config.use_conv_bias,
                          "dt_min": config.time_step_min, "dt_max": config.time_step_max}
        if tuple(config.time_step_limit) != (0.0, float("inf")):
            out["ssm_cfg"]["dt_limit"] = list(config.time_step_limit)
    else:
        out["ssm_cfg"] = {"layer": "Mamba1", "d_state": config.state_size, "d_conv": config.conv_kernel,
                          "expand": config.expand, "dt_rank": config.time_step_rank, "bias": config.use_bias,
                          "conv_bias": config.use_conv_bias, "dt_min": config.time_step_min,
                          "dt_max": config.time_step_max}
    return out


def read_state_dict(path: Path) -> dict:
    """Tensors of a ``.safetensors`` or ``.bin`` file; refuses pickles that hold anything else."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused: the pickle holds objects other than tensors and plain containers, and loading it "
            f"would execute code ({err}); convert it to safetensors on a trusted machine"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint ({err})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat dict of tensors (a state dict)")
    return state


def _weights_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def _local_dir(path_or_id: str, weights: bool = True) -> Path:
    """A local checkpoint directory, or a hub id's files downloaded: its configs and tokenizer files, and
    with ``weights`` one format of its weights (safetensors where the repository has them, as
    transformers prefers, else the pickles: never both)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory")
    try:
        from huggingface_hub import list_repo_files, snapshot_download

        patterns = ["*.json", "*.txt", "*.model"]
        if weights:
            files = list_repo_files(path_or_id)
            patterns.append("*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin")
        return Path(snapshot_download(path_or_id, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - every hub failure means the same to the user
        raise CheckpointError(f"{path_or_id}: not a local directory, and the hub could not provide it ({err})") from None


def _hf_model_from_mamba_ssm(directory: Path, config: dict, dtype):
    from transformers import AutoModelForCausalLM

    hf_config = hf_config_from_mamba_ssm(config, directory / "config.json")
    weights = _weights_file(directory)
    state = read_state_dict(weights)
    state = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in state.items()}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    expected = model.state_dict()
    if hf_config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    for key, value in state.items():
        if key not in expected:
            raise CheckpointError(f"{weights}: unexpected key {key!r} for a {type(model).__name__}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{weights}: key {key!r} has shape {tuple(value.shape)}, the config implies {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{weights}: missing key {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    model = model.to_empty(device="cpu").to(dtype or stored_dtype(state))
    model.load_state_dict(state, strict=False)
    if hf_config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def stored_dtype(state: dict) -> torch.dtype:
    """The floating dtype most of a state dict's elements are stored in (what a model loaded without a
    ``dtype`` keeps, as transformers does for its own checkpoints)."""
    counts: dict = {}
    for value in state.values():
        if value.is_floating_point():
            counts[value.dtype] = counts.get(value.dtype, 0) + value.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def load_model(path_or_id: Union[str, Path], *, device=None, dtype: Optional[torch.dtype] = None, host: str = "auto"):
    """A Mamba / Mamba-2 causal LM from a mamba_ssm- or HF-format checkpoint (directory or hub id;
    ``embedded`` = the embedded model).

    host: ``auto``/``transformers`` -> a transformers model (mamba_ssm checkpoints converted);
    ``mamba_ssm`` -> a ``mamba_ssm`` ``MambaLMHeadModel`` (needs mamba_ssm, i.e. a CUDA machine).
    """
    if host not in ("auto", "transformers", "mamba_ssm"):
        raise ValueError(f"host must be 'auto', 'transformers' or 'mamba_ssm', got {host!r}")
    if device is not None:
        device = check_device(device)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must be a torch dtype or its name (float32, bfloat16, float16), got {dtype!r}")
        dtype = getattr(torch, dtype)
    directory = _local_dir(resolve_model_name(str(path_or_id)))
    config = _read_json(directory / "config.json")
    if host == "mamba_ssm":
        model = _mamba_ssm_model(directory, config, dtype)
    elif is_mamba_ssm_config(config):
        model = _hf_model_from_mamba_ssm(directory, config, dtype)
    else:
        from transformers import AutoModelForCausalLM

        from safetensors import SafetensorError

        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"{directory}: its weights file needs more than plain tensors to load (refused, nothing of it "
                f"was run; only safetensors or weights-only pickles load): {err}"
            ) from None
        except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as err:
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"{directory}: could not be loaded ({type(err).__name__}: {err})") from err
    return model.to(device) if device is not None else model


def checkpoint_format(path_or_id: Union[str, Path]) -> str:
    """``"mamba_ssm"`` or ``"hf"``: the format of a checkpoint directory (or hub id)."""
    directory = _local_dir(resolve_model_name(str(path_or_id)), weights=False)
    return "mamba_ssm" if is_mamba_ssm_config(_read_json(directory / "config.json")) else "hf"


# The tokenizer of the state-spaces checkpoints, which ship without one.
MAMBA_SSM_TOKENIZER = "EleutherAI/gpt-neox-20b"


def load_tokenizer(path_or_id: Union[str, Path]):
    """The checkpoint's own tokenizer, or for a mamba_ssm checkpoint without one the GPT-NeoX
    tokenizer the state-spaces models were trained with."""
    from transformers import AutoTokenizer

    directory = _local_dir(resolve_model_name(str(path_or_id)), weights=False)
    if any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return AutoTokenizer.from_pretrained(directory)
    try:
        return AutoTokenizer.from_pretrained(MAMBA_SSM_TOKENIZER)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(
            f"{directory}: holds no tokenizer, and {MAMBA_SSM_TOKENIZER} (the state-spaces models' tokenizer) could "
            f"not be loaded ({err}); copy a tokenizer into the checkpoint directory"
        ) from None


def _mamba_ssm_model(directory: Path, config: dict, dtype):
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError as err:
        raise ImportError(f"host='mamba_ssm' needs the mamba_ssm package (pip install 'ssm_reduce[mamba]'): {err}") from None
    if not is_mamba_ssm_config(config):
        from transformers import AutoConfig

        config = mamba_ssm_config_from_hf(AutoConfig.from_pretrained(directory))
        state = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
                 for k, v in read_state_dict(_weights_file(directory)).items()}
    else:
        state = read_state_dict(_weights_file(directory))
    fields = SSMConfig.__dataclass_fields__
    model = MambaLMHeadModel(SSMConfig(**{k: v for k, v in config.items() if k in fields}), device="cpu",
                             dtype=dtype or stored_dtype(state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise CheckpointError(f"{directory}: state dict does not match the config (missing {missing}, unexpected {unexpected})")
    return model.eval()


def save_model(model, directory: Union[str, Path], format: str = "hf") -> Path:
    """Write a transformers Mamba / Mamba-2 causal LM as a HF checkpoint (``save_pretrained``) or as a
    mamba_ssm checkpoint (``config.json`` + ``pytorch_model.bin``); ``load_model`` reads either back
    exactly."""
    if format not in ("hf", "mamba_ssm"):
        raise ValueError(f"format must be 'hf' or 'mamba_ssm', got {format!r}")
    directory = Path(directory)
    if format == "hf":
        model.save_pretrained(directory)
        return directory
    if type(model.config).__name__ not in ("MambaConfig", "Mamba2Config") or not hasattr(model, "lm_head"):
        raise TypeError(f"format='mamba_ssm' needs a transformers MambaForCausalLM or Mamba2ForCausalLM, got {type(model).__name__}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(mamba_ssm_config_from_hf(model.config), indent=2) + "\n")
    state = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    torch.save(state, directory / "pytorch_model.bin")
    return directory
