"""The conversation attacks on a recorded device view: KV inversion, hidden-state inversion and vocabulary
matching read a `plain` conversation back, see through a per-head permuted cache only with invariant
features, and find nothing to attack under `secureinfer`.

Attacks are graded against the token ids the enclave sent (read here only as ground truth: the attacks
never read them, and a test scrambles them to show it).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import secureinfer
from gguf_fixtures import tiny_llama_config, tiny_llama_model
from secureinfer.attacks.kv_inversion import invert_hidden_states, invert_kv_cache
from secureinfer.attacks.view import VIEW_FILES, DeviceView
from secureinfer.attacks.vocab_matching import match_vocabulary
from secureinfer.errors import InvalidRequestError
from secureinfer.model import Llama, ModelConfig, load_checkpoint

TINY_PROMPTS = ["the cat and the dog sat on the mat", "is it on"]  # two lengths: the batch is left-padded

# Realistic private chats (kept short: every cached token is attacked). The spans must come back.
CONVERSATIONS = [
    [
        {"role": "user", "content": "Hi, I'm Maria Lopez, 42 Elm Street, Springfield. My card ends in 4417. "
                                    "Remind me to call Dr. Patel on Tuesday."},
    ],
    [
        {"role": "user", "content": "My account number is 88-301-7765 and my PIN is 2291. Can you check my balance?"},
        {"role": "assistant", "content": "I can't access bank accounts, but I can help you plan a transfer."},
        {"role": "user", "content": "Then send $450 to Tom Becker at 17 Harbor Road, Leeds."},
    ],
    [
        {"role": "system", "content": "You are a clinic assistant."},
        {"role": "user", "content": "Patient Aisha Khan, born 3 March 1981, takes 20 mg atorvastatin "
                                    "and is allergic to penicillin."},
    ],
]  # fmt: skip
SENSITIVE_SPANS = [
    ["Maria Lopez", "42 Elm Street", "4417", "Dr. Patel"],
    ["88-301-7765", "2291", "Tom Becker", "17 Harbor Road"],
    ["Aisha Khan", "3 March 1981", "atorvastatin", "penicillin"],
]


@pytest.fixture(autouse=True)
def one_thread():
    """The attacks run many small tensor ops; on a shared 2-core machine a second intra-op thread mostly
    waits for a core (measured: 10x slower), so run them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sent_tokens(view: DeviceView) -> torch.Tensor:
    """The token ids the enclave sent for the final conversation, [batch, positions]: the ground truth."""
    runs = view.conversation_runs()
    return torch.cat([view.message_tensor(run.tensors["tokens"]) for run in runs], dim=1)


def recovery(guesses: list[int | None], truth: list[int]) -> float:
    """Share of the guessed (non-padding) positions whose guess is the true token."""
    pairs = [(guess, true) for guess, true in zip(guesses, truth, strict=True) if guess is not None]
    return sum(guess == true for guess, true in pairs) / len(pairs)


def derived_view(source, target, **rewritten: dict[str, torch.Tensor]):
    """A copy of a view with some tensor files rewritten (`state=...`, `messages=...`); the rest linked."""
    target.mkdir()
    for name in ("manifest.json", *VIEW_FILES):
        stem = name.removesuffix(".safetensors")
        if stem in rewritten:
            save_file(rewritten[stem], target / name)
        else:
            (target / name).symlink_to((source / name).resolve())
    return target


def permuted_cache_state(source, seed: int) -> dict[str, torch.Tensor]:
    """The view's state with every head's keys and values permuted along head_dim, as KV-Shield permutes:
    one random permutation per (layer, head, k or v), the same at every position."""
    generator = torch.Generator().manual_seed(seed)
    state = load_file(source / "state.safetensors")
    for name in ("kv.k", "kv.v"):
        cache = state[name].clone()
        layers, _, heads, _, dim = cache.shape
        for layer in range(layers):
            for head in range(heads):
                cache[layer, :, head] = cache[layer, :, head][..., torch.randperm(dim, generator=generator)]
        state[name] = cache
    return state


# --- tiny random-weight model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_gguf):
    return load_checkpoint(tiny_gguf, progress=False)


@pytest.fixture(scope="module")
def tiny_public(tiny_checkpoint):
    return Llama.from_state_dict(tiny_checkpoint.config, tiny_checkpoint.weights)


@pytest.fixture(scope="module")
def tiny_plain_view(tmp_path_factory, tiny_checkpoint):
    directory = tmp_path_factory.mktemp("plain-view")
    with secureinfer.SecureLM(tiny_checkpoint, "plain", record_view=directory, threads=1) as lm:
        lm.generate_batch(TINY_PROMPTS, max_new_tokens=4, ignore_eos=True)
    return directory


@pytest.fixture(scope="module")
def tiny_truth(tiny_plain_view, tiny_checkpoint):
    truth = sent_tokens(DeviceView.load(tiny_plain_view))
    prompts = [tiny_checkpoint.tokenizer.encode(prompt) for prompt in TINY_PROMPTS]
    pad = len(prompts[0]) - len(prompts[1])
    assert pad > 0 and truth[0, : len(prompts[0])].tolist() == prompts[0]
    assert truth[1, pad : len(prompts[0])].tolist() == prompts[1]
    return truth, pad


def assert_reads_the_tiny_conversation(result, truth, pad):
    assert result.nothing_to_attack is None and result.clear_token_ids
    assert result.tokens[0] == truth[0].tolist()
    assert result.tokens[1] == [None] * pad + truth[1, pad:].tolist()  # padding is no guess


@pytest.mark.parametrize("attack", [invert_kv_cache, invert_hidden_states])
def test_inversion_reads_every_token_of_a_plain_tiny_view(tiny_plain_view, tiny_public, tiny_truth, attack):
    result = attack(DeviceView.load(tiny_plain_view), tiny_public)
    assert_reads_the_tiny_conversation(result, *tiny_truth)
    assert max(d for row in result.distances for d in row if d is not None) < 1e-4


@pytest.mark.parametrize(
    "options",
    [
        {"features": "raw"}, {"features": "sorted"}, {"features": "gram"}, {"layer": 1}, {"layer": 1, "features": "gram"},
        {"features": "sorted", "max_candidates": 64, "tolerance": 0.0},  # one chunk, never "found": as on int8
    ],  # fmt: skip
)
def test_vocab_matching_reads_every_token_of_a_plain_tiny_view(tiny_plain_view, tiny_public, tiny_truth, options):
    result = match_vocabulary(DeviceView.load(tiny_plain_view), tiny_public, chunk_size=64, **options)
    assert_reads_the_tiny_conversation(result, *tiny_truth)
    assert f"layer {options.get('layer', 0)}" in result.used[0]


def test_the_attacks_never_read_the_token_ids_the_device_was_sent(tmp_path, tiny_plain_view, tiny_public, tiny_truth):
    """With every token id in the view replaced by a random one, the attacks still read the true tokens."""
    generator = torch.Generator().manual_seed(1)

    def scrambled(tensors):
        return {
            key: torch.randint(0, 1000, t.shape, generator=generator) if key.endswith("tokens") else t
            for key, t in tensors.items()
        }

    messages = load_file(tiny_plain_view / "messages.safetensors")
    state = load_file(tiny_plain_view / "state.safetensors")
    assert any(key.endswith("tokens") for key in messages) and "values.tokens" in state
    scrambled_view = derived_view(
        tiny_plain_view, tmp_path / "scrambled", messages=scrambled(messages), state=scrambled(state)
    )
    view = DeviceView.load(scrambled_view)
    assert not torch.equal(sent_tokens(view), tiny_truth[0])
    results = [
        invert_kv_cache(view, tiny_public),
        invert_hidden_states(view, tiny_public),
        match_vocabulary(view, tiny_public),
        match_vocabulary(view, tiny_public, layer=1, chunk_size=64),
    ]
    for result in results:
        assert_reads_the_tiny_conversation(result, *tiny_truth)


def test_a_per_head_permuted_cache_falls_to_invariant_features_only(tmp_path, tiny_plain_view, tiny_public, tiny_truth):
    truth, pad = tiny_truth
    state = permuted_cache_state(tiny_plain_view, seed=0)
    view = DeviceView.load(derived_view(tiny_plain_view, tmp_path / "permuted", state=state))
    for features in ("sorted", "gram"):
        assert_reads_the_tiny_conversation(match_vocabulary(view, tiny_public, features=features), truth, pad)
    deeper = match_vocabulary(view, tiny_public, layer=1, features="gram", chunk_size=64)
    assert_reads_the_tiny_conversation(deeper, truth, pad)
    # The attacks that assume the model's own basis are lost (chance is 1 in the vocabulary).
    for result in (invert_kv_cache(view, tiny_public), match_vocabulary(view, tiny_public, features="raw")):
        assert recovery(result.tokens[0], truth[0].tolist()) < 0.3


def test_a_secureinfer_view_holds_nothing_to_attack(tmp_path, tiny_checkpoint, tiny_public):
    with secureinfer.SecureLM(tiny_checkpoint, "secureinfer", record_view=tmp_path, threads=1) as lm:
        lm.generate(TINY_PROMPTS[0], max_new_tokens=3)
    view = DeviceView.load(tmp_path)
    results = [attack(view, tiny_public) for attack in (invert_kv_cache, invert_hidden_states, match_vocabulary)]
    for result in results:
        assert result.tokens == [] and not result.clear_token_ids
    assert [r.nothing_to_attack for r in results] == [
        "the device held no KV cache",
        "the device neither held nor received layer 0's input (x or h) in floating point",
        "the device held no KV cache",
    ]


def test_loading_refuses_a_missing_or_incomplete_view(tmp_path, tiny_plain_view):
    with pytest.raises(InvalidRequestError, match="does not exist"):
        DeviceView.load(tmp_path / "nowhere")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_plain_view, incomplete)
    (incomplete / "manifest.json").unlink()
    with pytest.raises(InvalidRequestError, match="no manifest.json, so it is incomplete"):
        DeviceView.load(incomplete)
    lacking = derived_view(tiny_plain_view, tmp_path / "lacking")
    (lacking / "state.safetensors").unlink()
    with pytest.raises(InvalidRequestError, match="lacks state.safetensors"):
        DeviceView.load(lacking)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InvalidRequestError, match="is not a device view"):
        DeviceView.load(tmp_path / "other")


def test_the_view_reads_weights_cache_and_positions_as_held(tiny_plain_view, tiny_checkpoint, tiny_truth):
    view = DeviceView.load(tiny_plain_view)
    assert view.config == tiny_checkpoint.config
    assert torch.equal(view.weight("lm_head"), tiny_checkpoint.weights["model.embed_tokens.weight"])  # an alias
    keys, values = view.kv_cache()
    assert keys.shape == values.shape == (2, 2, 2, tiny_truth[0].shape[1], 16) and view.kv_layers == [0, 1]
    _, pad = tiny_truth
    assert view.cache_positions()[1].tolist() == [-1] * pad + list(range(tiny_truth[0].shape[1] - pad))


def test_attacks_refuse_a_public_model_of_another_shape(tiny_plain_view):
    other = tiny_llama_model(tiny_llama_config(hidden_size=32, head_dim=8))
    public = Llama.from_state_dict(ModelConfig.from_hf_config(other.config.to_dict()), other.state_dict())
    view = DeviceView.load(tiny_plain_view)
    for attack in (invert_kv_cache, invert_hidden_states, match_vocabulary):
        with pytest.raises(InvalidRequestError, match="different model"):
            attack(view, public)
    with pytest.raises(InvalidRequestError, match="unknown features"):
        match_vocabulary(view, public, features="sorted-ish")


# --- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_public(real_checkpoint):
    return Llama.from_state_dict(real_checkpoint.config, real_checkpoint.weights)


@pytest.fixture(scope="module")
def real_plain_view(tmp_path_factory, real_checkpoint):
    """The three conversations as one left-padded batch under `plain`, a few reply tokens each."""
    directory = tmp_path_factory.mktemp("real-plain")
    prompts = [real_checkpoint.tokenizer.render_chat(conversation) for conversation in CONVERSATIONS]
    with secureinfer.SecureLM(real_checkpoint, "plain", record_view=directory) as lm:
        lm.generate_batch(prompts, max_new_tokens=4, ignore_eos=True)
    return directory


@pytest.fixture(scope="module")
def real_truth(real_plain_view, real_checkpoint):
    truth = sent_tokens(DeviceView.load(real_plain_view))
    prompts = [real_checkpoint.tokenizer.apply_chat_template(conversation) for conversation in CONVERSATIONS]
    longest = max(map(len, prompts))
    for row, prompt in zip(truth, prompts):
        assert row[longest - len(prompt) : longest].tolist() == prompt
    return [row[longest - len(prompt) :].tolist() for row, prompt in zip(truth, prompts)]


def assert_reads_the_conversations(result, truth, tokenizer, at_least=0.95):
    assert result.nothing_to_attack is None and result.clear_token_ids
    for guesses, true, spans in zip(result.tokens, truth, SENSITIVE_SPANS):
        real = guesses[len(guesses) - len(true) :]
        assert recovery(real, true) >= at_least
        text = tokenizer.decode([token for token in real if token is not None])
        assert all(span in text for span in spans), text


@pytest.mark.integration
def test_plain_conversations_fall_to_kv_and_hidden_state_inversion(
    real_plain_view, real_public, real_truth, real_checkpoint
):
    view = DeviceView.load(real_plain_view)
    for attack in (invert_kv_cache, invert_hidden_states):
        assert_reads_the_conversations(attack(view, real_public), real_truth, real_checkpoint.tokenizer)


@pytest.mark.integration
def test_plain_conversations_fall_to_vocab_matching(real_plain_view, real_public, real_truth, real_checkpoint):
    result = match_vocabulary(DeviceView.load(real_plain_view), real_public)
    assert_reads_the_conversations(result, real_truth, real_checkpoint.tokenizer)


@pytest.mark.integration
def test_a_per_head_permuted_cache_falls_to_sorted_value_matching(
    tmp_path, real_plain_view, real_public, real_truth, real_checkpoint
):
    state = permuted_cache_state(real_plain_view, seed=0)
    view = DeviceView.load(derived_view(real_plain_view, tmp_path / "permuted", state=state))
    result = match_vocabulary(view, real_public, features="sorted")
    assert_reads_the_conversations(result, real_truth, real_checkpoint.tokenizer)
    for result in (invert_kv_cache(view, real_public), match_vocabulary(view, real_public, features="raw")):
        assert all(recovery(row[len(row) - len(true) :], true) < 0.1 for row, true in zip(result.tokens, real_truth))


@pytest.mark.integration
def test_a_secureinfer_conversation_leaves_nothing_to_attack(tmp_path, real_checkpoint, real_public):
    with secureinfer.SecureLM(real_checkpoint, "secureinfer", record_view=tmp_path) as lm:
        lm.chat(CONVERSATIONS[0], max_new_tokens=2)
    view = DeviceView.load(tmp_path)
    for attack in (invert_kv_cache, invert_hidden_states, match_vocabulary):
        result = attack(view, real_public)
        assert result.nothing_to_attack and result.tokens == [] and not result.clear_token_ids
