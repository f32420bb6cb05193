"""Attention-score matching: read tokens from the scores a device computes when it runs attention for the enclave.

A scheme that keeps attention on the device must let it form q k^T, however it transforms q and k: the
softmax needs the scores. At layer 0 a token's query and key depend only on the token and its position, and
RoPE turns both by the same angle at the same position, so each head's self-score q_t . k_t depends on the
token alone. The attacker computes it for every vocabulary entry through the public model (with the int8
pipeline when the device's weights are int8, as the blinded schemes' are: the quantization is public too)
and takes, per position, the token whose self-scores over all heads are nearest.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..crypto.quant import int8_linear, quantize_weight
from ..model.llama import Llama
from .kv_inversion import by_position, check_public_model, guessed_positions, normed_embeddings
from .view import ConversationRecovery, DeviceView

METHOD = (
    "per position, each layer-0 head's self-score q'.k' from the queries and keys the device received, matched to "
    "every vocabulary token's self-scores through the public model (nearest over all heads)"
)
VOCAB_CHUNK = 4096


def self_scores(q: Tensor, k: Tensor, num_heads: int, num_kv_heads: int) -> Tensor:
    """[..., q_size] and [..., kv_size] -> [..., num_heads]: each query head's dot product with its group's key."""
    q_heads = q.unflatten(-1, (num_heads, -1))
    k_heads = k.unflatten(-1, (num_kv_heads, -1)).repeat_interleave(num_heads // num_kv_heads, dim=-2)
    return (q_heads.double() * k_heads.double()).sum(-1)


def vocabulary_self_scores(public: Llama, int8: bool) -> Tensor:
    """[vocab, num_heads]: every token's layer-0 self-scores, as the victim's pipeline computes q and k."""
    cfg = public.config
    weight = public.weights.layers[0].wqkv[: cfg.q_size + cfg.kv_size]
    quantized = quantize_weight(weight) if int8 else None
    scores = []
    for rows in normed_embeddings(public).split(VOCAB_CHUNK):
        qk = int8_linear(rows, quantized) if int8 else rows @ weight.T
        scores.append(self_scores(qk[:, : cfg.q_size], qk[:, cfg.q_size :], cfg.num_heads, cfg.num_kv_heads))
    return torch.cat(scores)


def match_attention_scores(view: DeviceView, public: Llama) -> ConversationRecovery:
    clear = view.holds_clear_token_ids()
    runs = [run for run in view.conversation_runs() if run.runs_op("attention", 0) and {"q", "k"} <= set(run.tensors)]
    if not runs:
        reason = "the device was never sent layer-0 queries and keys to run attention on"
        return ConversationRecovery.nothing("attention_score_matching", METHOD, reason, clear)
    check_public_model(view, public)
    cfg = public.config
    candidates = vocabulary_self_scores(public, int8="layers.0.wqkv.q" in view.weight_names)
    scale = candidates.abs().mean(dim=0)  # heads differ in scale; weigh each by its typical magnitude
    units = candidates / scale
    batch = view.message_tensor(runs[0].tensors["q"]).shape[0]
    length = max(run.meta["start"] + run.meta["length"] for run in runs)
    tokens = torch.full((batch, length), -1)
    distances = torch.full((batch, length), float("nan"))
    for run in runs:
        q, k = (view.message_tensor(run.tensors[name]) for name in ("q", "k"))
        observed = self_scores(q, k, cfg.num_heads, cfg.num_kv_heads).flatten(0, 1) / scale
        best = torch.cdist(observed, units).min(dim=-1)
        covered = slice(run.meta["start"], run.meta["start"] + run.meta["length"])
        tokens[:, covered] = best.indices.view(batch, -1)
        distances[:, covered] = best.values.view(batch, -1).float()
    observed_positions = guessed_positions(view, tokens)
    return ConversationRecovery(
        attack="attention_score_matching",
        method=METHOD,
        tokens=by_position(tokens, observed_positions),
        distances=by_position(distances, observed_positions),
        used=["messages:q, k of layer-0 attention runs"],
        clear_token_ids=clear,
    )
