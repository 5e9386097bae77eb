"""kvray: evaluate, tune and serve KV-cache compression for Hugging Face LLMs.

`import kvray` never imports ray or triton and changes nothing global."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("kvray")
except PackageNotFoundError:  # plain source tree (e.g. `ray job submit --working-dir .`)
    __version__ = "0.1.0"

from .budget import BudgetPlan
from .cache import KVRayCache
from .generate import GenerationOutput, GenerationStats, generate
from .models import LanguageModel, ModelNotFoundError, load_model, load_tokenizer
from .presses import Press, describe_methods, list_methods, make_press
from .runtime.support import UnsupportedModelError

__all__ = [
    "BudgetPlan", "KVRayCache", "GenerationOutput", "GenerationStats", "generate", "LanguageModel",
    "ModelNotFoundError", "load_model", "load_tokenizer", "Press", "describe_methods", "list_methods",
    "make_press", "UnsupportedModelError", "__version__",
]
