"""Shared fixtures: an isolated model cache, tiny real-format GGUF models, and the real bundled model."""

from __future__ import annotations

import os

import pytest
import torch

from gguf_fixtures import tiny_llama_config, tiny_llama_model, write_llama_gguf

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep the user's cache untouched; subprocesses (CLI tests) inherit the variable."""
    path = tmp_path_factory.mktemp("secureinfer-cache")
    previous = os.environ.get("SECUREINFER_CACHE_DIR")
    os.environ["SECUREINFER_CACHE_DIR"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("SECUREINFER_CACHE_DIR", None)
    else:
        os.environ["SECUREINFER_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_hf_model():
    """A random-weight 2-layer GQA LlamaForCausalLM (transformers), the reference for the tiny tests."""
    return tiny_llama_model()


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_hf_model):
    """`tiny_hf_model` written as an F32 GGUF the way llama.cpp writes LLaMA, with a byte-level BPE tokenizer."""
    return write_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", tiny_hf_model)


@pytest.fixture(scope="session")
def short_context_gguf(tmp_path_factory):
    """A tiny model whose context holds only 32 tokens, to test prompts that do not fit."""
    config = tiny_llama_config(max_position_embeddings=32)
    return write_llama_gguf(tmp_path_factory.mktemp("short") / "short.gguf", tiny_llama_model(config))


@pytest.fixture(scope="session")
def tiny_lm(tiny_gguf):
    import secureinfer

    return secureinfer.load(tiny_gguf, progress=False)


@pytest.fixture(scope="session")
def real_checkpoint():
    """The bundled SmolLM2-135M-Instruct (first load dequantizes, ~10 s)."""
    from secureinfer.model import load_checkpoint

    return load_checkpoint(progress=False)


@pytest.fixture(scope="session")
def real_engine(real_checkpoint):
    """Our in-process engine on the real model: the reference every scheme is held to."""
    from secureinfer.engine import Generator
    from secureinfer.model import Llama

    config = real_checkpoint.config
    model = Llama.from_state_dict(config, real_checkpoint.weights)
    return Generator(model, real_checkpoint.tokenizer, config.max_position_embeddings)


@pytest.fixture(scope="session")
def real_hf_model():
    """transformers' fp32 model loaded by transformers' own GGUF loader from the bundled file (~12 s)."""
    from transformers import AutoModelForCausalLM

    from secureinfer.model import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(params=["compiled", "torch"])
def int8_route(request, monkeypatch):
    """Run a test on the int8 route's compiled kernel (which builds here), then on its torch steps."""
    from secureinfer.crypto import field

    if request.param == "compiled":
        assert field.build(field.FIELD_KERNELS)[0] is not None, field.build(field.FIELD_KERNELS)[1]
    else:
        monkeypatch.setattr(field, "_compiled_route", lambda values, weight_t, backend: None)
    return request.param


@pytest.fixture
def torch_threads(request):
    """torch on this many threads for the test (default 2, where a large narrow weight is packed; on one, a VNNI
    CPU's few-row products take the compiled loop), restored after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(getattr(request, "param", 2))
    yield torch.get_num_threads()
    torch.set_num_threads(previous)
