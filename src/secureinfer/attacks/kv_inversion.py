"""KV inversion (KV-Cloak, NDSS'26): read the conversation back from the device's layer-0 KV cache, or from
the layer-0 hidden states it held, through the public base model.

Layer 0's keys and values are linear in the token's normalized embedding h = rms_norm(E[t], w_attn_norm):
k = RoPE(W_k h, position) and v = W_v h. The attacker knows W_k, W_v and the embedding (the public base
checkpoint) and every position (cache index i of a row holds position i minus the row's left padding, which
the run metadata gives). So it undoes RoPE (a rotation), solves W_kv h = [k; v] by least squares and takes
the closest token.

Keys and values of SmolLM2's layer 0 give 2 x 3 x 64 = 384 equations for a 576-dim h: the system is
underdetermined, and the minimum-norm solution is the orthogonal projection of the true h onto the row space
of W_kv. KV-Cloak's literal last step, the nearest normalized embedding by cosine, compares that projection
with whole embeddings, whose components outside the row space the cache never saw: on four real `plain`
conversations (308 cached tokens) it recovered 95-96% of the tokens. Comparing with each candidate's own
projection onto that row space recovered 100%, so that is the match used here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InvalidRequestError
from ..model.llama import Llama, apply_rope, rms_norm
from .view import ConversationRecovery, DeviceView, ViewMessage

KV_METHOD = (
    "undo RoPE on the layer-0 keys, minimum-norm least squares through the public W_k and W_v, "
    "nearest normalized embedding by cosine within the row space of W_kv"
)
HIDDEN_METHOD = "nearest public embedding (x) or normalized embedding (h) by cosine to the layer-0 input"
QUERY_ROWS = 256  # cosine similarities are taken against the whole vocabulary this many observations at a time


def invert_kv_cache(
    view: DeviceView,
    public: Llama,
    cache: tuple[Tensor, Tensor] | None = None,
    attack: str = "kv_inversion",
    method: str = KV_METHOD,
) -> ConversationRecovery:
    """Recover every cached token from the final layer-0 keys and values in `view`, or from `cache` (keys,
    values laid out like the view's), e.g. the view's cache after undoing a recovered key."""
    clear = view.holds_clear_token_ids()
    if reason := view.kv_unusable(0):
        return ConversationRecovery.nothing(attack, method, reason, clear)
    check_public_model(view, public)
    keys, values = cache if cache is not None else view.kv_cache()
    positions = view.cache_positions()
    where = positions.clamp(min=0)
    # RoPE rotates each (i, i + head_dim/2) pair by a position's angle; rotating by minus that angle undoes it.
    unrotated = apply_rope(keys[0].float(), public.rope_cos[where], -public.rope_sin[where])
    observed = torch.cat([heads_flat(unrotated), heads_flat(values[0].float())], dim=-1)

    weight = layer0_kv_weight(public).double()
    pseudo_inverse = torch.linalg.pinv(weight)
    estimate = (observed.double() @ pseudo_inverse.T).float()  # the minimum-norm least-squares h
    row_space = (pseudo_inverse @ weight).float()  # orthogonal projector onto what K and V determine
    candidates = normed_embeddings(public) @ row_space.T
    tokens, distances = nearest_by_cosine(estimate.flatten(0, 1), candidates)
    shape = positions.shape
    return ConversationRecovery(
        attack=attack,
        method=method,
        tokens=by_position(tokens.view(shape), positions >= 0),
        distances=by_position(distances.view(shape), positions >= 0),
        used=["state:kv.k[layer 0]", "state:kv.v[layer 0]", "manifest:run meta (pad)"],
        clear_token_ids=clear,
    )


def invert_hidden_states(view: DeviceView, public: Llama) -> ConversationRecovery:
    """Recover tokens from layer 0's input wherever the device held or received it in floating point.

    That input is the embedding row x = E[t] (held by a device that ran the embedding lookup, or sent to one
    whose run starts at layer 0's norm) or its normed copy h (held after layer 0's norm, or sent to a run
    starting at layer 0's projection). Covers the conversation of the final KV cache (runs since the last
    `new_cache`), indexed like the cache.
    """
    clear = view.holds_clear_token_ids()
    runs = view.conversation_runs()
    found = [(run, *source) for run in runs if (source := _layer0_input(view, run)) is not None]
    if not found:
        reason = "the device neither held nor received layer 0's input (x or h) in floating point"
        return ConversationRecovery.nothing("hidden_inversion", HIDDEN_METHOD, reason, clear)
    check_public_model(view, public)
    references = {"x": public.weights.embed, "h": normed_embeddings(public)}
    batch = found[0][3].shape[0]
    length = max(run.meta["start"] + run.meta["length"] for run, *_ in found)
    tokens = torch.full((batch, length), -1)
    distances = torch.full((batch, length), float("nan"))
    for run, name, key, hidden in found:
        covered = slice(run.meta["start"], run.meta["start"] + run.meta["length"])
        ids, distance = nearest_by_cosine(hidden.flatten(0, 1).float(), references[name])
        tokens[:, covered], distances[:, covered] = ids.view(hidden.shape[:2]), distance.view(hidden.shape[:2])
    observed = guessed_positions(view, tokens)
    return ConversationRecovery(
        attack="hidden_inversion",
        method=HIDDEN_METHOD,
        tokens=by_position(tokens, observed),
        distances=by_position(distances, observed),
        used=[f"messages:{key}" for _, _, key, _ in found],
        clear_token_ids=clear,
    )


def check_public_model(view: DeviceView, public: Llama) -> None:
    """Refuse a public model whose shapes differ from the model the view was recorded with."""
    if view.config is None:
        return
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")
    differ = [f for f in fields if getattr(view.config, f) != getattr(public.config, f)]
    if differ:
        raise InvalidRequestError(
            f"the view was recorded with a different model ({', '.join(differ)} differ from the public model's)",
            "attack it with the public base checkpoint of the model the view's session ran",
        )


def normed_embeddings(public: Llama) -> Tensor:
    """What layer 0 projects for each vocabulary token: rms_norm(E[t], w_attn_norm), [vocab, hidden]."""
    return rms_norm(public.weights.embed, public.weights.layers[0].attn_norm, public.config.rms_norm_eps)


def layer0_kv_weight(public: Llama) -> Tensor:
    """The key and value rows of layer 0's fused projection (`wqkv` stacks q, k, v): [2 * kv_size, hidden]."""
    return public.weights.layers[0].wqkv[public.config.q_size :]


def heads_flat(per_head: Tensor) -> Tensor:
    """[batch, heads, positions, head_dim] -> [batch, positions, heads * head_dim], the projection's layout."""
    return per_head.transpose(1, 2).flatten(2)


def nearest_by_cosine(queries: Tensor, references: Tensor) -> tuple[Tensor, Tensor]:
    """For each query row, the most cosine-similar reference row and 1 - that similarity."""
    unit_references = F.normalize(references, dim=-1)
    ids, distances = [], []
    for chunk in queries.split(QUERY_ROWS):
        best = (F.normalize(chunk, dim=-1) @ unit_references.T).max(dim=-1)
        ids.append(best.indices)
        distances.append(1 - best.values)
    return torch.cat(ids), torch.cat(distances)


def guessed_positions(view: DeviceView, tokens: Tensor) -> Tensor:
    """[batch, length] True where `tokens` (-1: no guess) holds a guess of a real, unpadded position."""
    pad = view.conversation_pad()
    index = torch.arange(tokens.shape[1]).expand_as(tokens)
    return (tokens >= 0) & (index >= (0 if pad is None else pad[:, None]))


def by_position(values: Tensor, observed: Tensor) -> list[list]:
    """Rows of per-position values as lists, None where `observed` is False."""
    return [
        [value if kept else None for value, kept in zip(row, mask)]
        for row, mask in zip(values.tolist(), observed.tolist())
    ]


def _layer0_input(view: DeviceView, run: ViewMessage) -> tuple[str, str, Tensor] | None:
    """The first floating-point copy of layer 0's input in `run`: (x or h, its key, the tensor)."""
    keys = [
        *(
            (name, held.tensors[name])
            for held in run.held
            for name, op in (("x", ("embed", None)), ("h", ("attn_norm", 0)))
            if (held.op, held.layer) == op and name in held.tensors
        ),
        *(
            (name, run.tensors[name])
            for name, first_op in (("x", ("attn_norm", 0)), ("h", ("qkv_proj", 0)))
            if run.ops and run.ops[0] == first_op and name in run.tensors
        ),
    ]
    for name, key in keys:
        tensor = view.message_tensor(key)
        if tensor.is_floating_point():
            return name, key, tensor
    return None
