"""The security audit: every attack against every scheme, from recorded device views, with fixed seeds.

For each scheme the audit replays each victim conversation through a fresh session that records the
device view, runs every conversation attack on that view alone (plus the public base model and
tokenizer the threat model grants), and scores the guesses against the conversation it knows. Then
it runs the tampering attack on schemes that outsource blinded products, a content search for the
demo adapter in the view of a session that loaded it, and (full size) model extraction against that
deployment with logit perturbation off and on. Results carry their chance level.
"""

from __future__ import annotations

import platform
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..api import SecureLM
from ..crypto.field import P
from ..data import DEMO_ADAPTER
from ..model import Checkpoint, Llama
from ..model.adapter import load_adapter
from ..model.kernels import flat_weights
from ..plan import PRESETS, build_plan
from .content import find_in_view, tensor_probes
from .extraction import BlackBoxRun, extraction_result, query_and_distil
from .key_recovery import held_attention_weights, invert_after_key_recovery, read_rope_key, recover_permutations
from .kv_inversion import invert_hidden_states, invert_kv_cache, normed_embeddings
from .metrics import aggregate_recovery, score_recovery, unigram_prior
from .score_matching import match_attention_scores
from .tamper import MODES, run_tamper_attack
from .traffic import counts_p_value, nearest_embedding_tokens, pad_reuse_pairs, uniformity_counts
from .victims import Conversation, load_conversations
from .view import ConversationRecovery, DeviceView
from .vocab_matching import match_vocabulary

# plain-int8 on request: it leaks as plain does; kvshield-fold too: its view differs from kvshield's only in W_o.
DEFAULT_SCHEMES = ("plain", "kvshield", "kvmix", "secureinfer", "hardened")
TAMPER_PROMPT = "Please summarise my account history."
SHORTLIST = 256


# The extraction issue's comparison; the head-keyed schemes would need the attacker to un-key a view's adapter first.
EXTRACTION_SCHEMES = ("plain", "secureinfer", "hardened")
EXTRACTION_PERTURBATIONS = (0.0, PRESETS["hardened"].runtime["perturbation"])  # off, and hardened's default
# Schemes whose API returns what another, cheaper deployment returns, tokens and logprobs, bit for bit at equal
# thread counts (tests/test_extraction.py, test_blinding.py, test_secureinfer_real.py): the black-box queries may go to that twin. A
# blinded answer took 4.6 s (8 tokens, batched 16 at a time) on a 2-core AVX2 CPU. The gray-box view is the scheme's own.
ANSWER_TWINS = {"secureinfer": "plain-int8", "hardened": "plain-int8"}


@dataclass(frozen=True)
class AuditSize:
    conversations: int | None  # victims replayed per scheme; None: all of them
    new_tokens: int  # reply tokens generated after each conversation
    tamper_trials: int  # per tampering mode
    tamper_tokens: int
    extraction_queries: int = 0  # API queries per extraction attack; 0 skips extraction
    extraction_epochs: int = 2
    extraction_oracle: str = "twin"  # "twin": black-box queries go to ANSWER_TWINS; "scheme": to the scheme itself


QUICK = AuditSize(conversations=2, new_tokens=4, tamper_trials=10, tamper_tokens=3)
FULL = AuditSize(conversations=None, new_tokens=8, tamper_trials=50, tamper_tokens=4, extraction_queries=100)


def _blinded_first_projection(view: DeviceView, public: Llama) -> ConversationRecovery:
    """The traffic attack scored like a conversation attack: nearest embedding to each blinded layer-0 input row."""
    runs = [run for run in view.conversation_runs() if run.meta.get("blinded") and run.runs_op("qkv_proj", 0)]
    clear = view.holds_clear_token_ids()
    if not runs:
        return ConversationRecovery.nothing(
            "blinded_nearest_embedding", "nearest embedding", "the device received no blinded layer-0 input", clear
        )
    rows = torch.cat([view.message_tensor(run.tensors["v"]) for run in runs])
    guesses = nearest_embedding_tokens(rows, normed_embeddings(public), P).tolist()
    return ConversationRecovery(
        "blinded_nearest_embedding",
        "each blinded layer-0 input row read as plaintext, nearest normalized embedding by cosine",
        [guesses],
        [[None] * len(guesses)],
        [run.tensors["v"] for run in runs],
        clear_token_ids=clear,
    )


ConversationAttack = Callable[[DeviceView, Llama], ConversationRecovery]
CONVERSATION_ATTACKS: dict[str, ConversationAttack] = {
    "kv_inversion": invert_kv_cache,
    "hidden_state_inversion": invert_hidden_states,
    # A shortlist of the 256 tokens whose values match best: an int8 device's cache sits ~1% off every fp32
    # candidate, so without one each position would check all 49k keys (minutes per conversation).
    "vocab_matching": lambda view, public: match_vocabulary(view, public, max_candidates=SHORTLIST),
    "vocab_matching_sorted": lambda view, public: match_vocabulary(
        view, public, features="sorted", max_candidates=SHORTLIST
    ),
    "blinded_nearest_embedding": _blinded_first_projection,
    "kv_inversion_after_key_recovery": invert_after_key_recovery,
    "attention_score_matching": match_attention_scores,
}


def _key_recovery(view: DeviceView, public: Llama, truth: torch.Tensor) -> dict:
    """How much of the session's head key the device view gives away, by each route."""
    held = held_attention_weights(view)
    matched = recover_permutations(held, flat_weights(public.weights), public.config, pair_units=True, truth=truth)
    read = read_rope_key(held, public.config)
    return {
        "weights_fraction": matched.fraction_recovered,
        "weights_confident": matched.confident,
        "rope_table_fraction": None if read is None else (read == truth).float().mean().item(),
    }


def _pool_key_recovery(per_view: list[dict]) -> dict | None:
    if not per_view:
        return None
    rope = [v["rope_table_fraction"] for v in per_view]
    return {
        "views": len(per_view),
        "weights_fraction": min(v["weights_fraction"] for v in per_view),
        "weights_confident": all(v["weights_confident"] for v in per_view),
        "rope_table_fraction": None if None in rope else min(rope),
    }


def traffic_statistics(view: DeviceView) -> dict | None:
    """Uniformity of everything blinded the device received, and pad reuse within each op."""
    by_op: dict[str, list[torch.Tensor]] = {}
    for message in view.messages:
        if message.direction == "in" and message.kind == "run" and message.meta.get("blinded"):
            by_op.setdefault(repr(message.ops), []).append(view.message_tensor(message.tensors["v"]))
    if not by_op:
        return None
    every = torch.cat([t.flatten() for rows in by_op.values() for t in rows])
    reused = sum(len(pad_reuse_pairs(torch.cat(rows), P)) for rows in by_op.values())
    counts = uniformity_counts(every, P)
    return {
        "elements": every.numel(), "uniformity_p": counts_p_value(counts), "pad_reuse_pairs": reused,
        "bin_counts": counts.tolist(),
    }  # fmt: skip


def _replay(checkpoint: Checkpoint, scheme: str, conversation: Conversation, view_dir: Path, new_tokens: int):
    """One victim session; returns the token ids the final KV cache holds, in order, and the session's head
    key (None for schemes without one), to score key recovery against."""
    with SecureLM(checkpoint, scheme, record_view=view_dir) as lm:
        result = lm.chat(list(conversation.messages), max_new_tokens=new_tokens)
        key = None if lm.runtime.head_key is None else lm.runtime.head_key.permutations.clone()
    prompt = checkpoint.tokenizer.apply_chat_template(list(conversation.messages))
    return prompt + result.tokens[:-1], key  # the last token is sampled, never fed back


def _record_adapter_view(checkpoint: Checkpoint, scheme: str, view_dir: Path) -> list[str]:
    """A session that loads the demo adapter and chats once, recorded; returns the sides that held the adapter."""
    with SecureLM(checkpoint, scheme, adapter=DEMO_ADAPTER, record_view=view_dir) as lm:
        lm.chat([{"role": "user", "content": "Who founded Quillmere Robotics?"}], max_new_tokens=4)
        return lm.plan.adapter_sides()


def _adapter_exposure(checkpoint: Checkpoint, view_dir: Path, held_by: list[str]) -> dict:
    """The adapter tensors whose bytes (in any precision) the view holds."""
    tensors = load_adapter(DEMO_ADAPTER, checkpoint.config).tensors
    found = {probe.split("[")[0] for probe, _, _ in find_in_view(view_dir, tensor_probes(tensors))}
    return {"held_by": held_by, "tensors": len(tensors), "found": len(found), "fraction_found": len(found) / len(tensors)}


class ExtractionStage:
    """Model extraction against each scheme's deployment of the demo adapter, perturbation off and on. Black-box
    runs are kept per (queried deployment, perturbation), so schemes with one answer twin share them."""

    def __init__(self, checkpoint: Checkpoint, size: AuditSize, seed: int, progress: bool, **options):
        self.checkpoint, self.size, self.seed, self.progress = checkpoint, size, seed, progress
        self.options = options  # query_and_distil's, e.g. another adapter and fact set for a model of other shapes
        self.runs: dict[tuple[str, float], BlackBoxRun] = {}
        self.git = _versions()["git"]  # the code that runs is the code at the start

    def __call__(self, scheme: str, view_dir: Path) -> dict:
        if not self.size.extraction_queries:
            return {"ran": False, "why": "the quick audit skips extraction (minutes per scheme); the full audit runs it"}
        if scheme not in EXTRACTION_SCHEMES:
            return {"ran": False, "why": f"extraction is measured on {', '.join(EXTRACTION_SCHEMES)} only"}
        queried = ANSWER_TWINS.get(scheme, scheme) if self.size.extraction_oracle == "twin" else scheme
        results = []
        for perturbation in EXTRACTION_PERTURBATIONS:
            if (queried, perturbation) not in self.runs:
                self.runs[queried, perturbation] = query_and_distil(
                    self.checkpoint, queried, self.size.extraction_queries, perturbation,
                    epochs=self.size.extraction_epochs, seed=self.seed,
                    progress=(lambda message: tqdm.write(f"extraction: {message}")) if self.progress else None,
                    **self.options,
                )  # fmt: skip
            run = self.runs[queried, perturbation]
            results.append(extraction_result(run, self.checkpoint, view_dir, scheme).to_dict())
        return {"ran": True, "queried": queried, "runs": results, "git": self.git}


def run_extraction_audit(
    checkpoint: Checkpoint, schemes: tuple[str, ...], size: AuditSize, seed: int = 0, progress: bool = True
) -> dict[str, dict]:
    """Only the extraction stage, per scheme (to add it to a report without replaying every conversation)."""
    extract = ExtractionStage(checkpoint, size, seed, progress)
    results = {}
    with tempfile.TemporaryDirectory(prefix="secureinfer-extraction-") as workdir:
        for scheme in tqdm(schemes, desc="extraction", disable=not progress):
            view_dir = Path(workdir) / scheme
            _record_adapter_view(checkpoint, scheme, view_dir)
            results[scheme] = extract(scheme, view_dir)
    return results


def _tampering(checkpoint: Checkpoint, scheme: str, size: AuditSize, seed: int) -> dict | None:
    if not any(p.transform == "blinded" for p in build_plan(scheme, checkpoint.config).placements):
        return None
    results = {}
    with SecureLM(checkpoint, scheme, channel="inprocess") as lm:
        for mode in MODES:
            attack = run_tamper_attack(
                lm, mode, size.tamper_trials, TAMPER_PROMPT, size.tamper_tokens, honest_runs=2, seed=seed
            )
            results[mode] = attack.to_dict()
    detected = sum(r["detected"] for r in results.values())
    trials = sum(r["trials"] for r in results.values())
    return {
        "modes": results,
        "trials": trials,
        "detection_rate": detected / trials,
        "false_alarms": sum(r["false_alarms"] for r in results.values()),
        "wrong_output": sum(r["wrong_output"] for r in results.values()),
    }


def _victims(size: AuditSize) -> list[Conversation]:
    return load_conversations()[: size.conversations]


def audit_config(size: AuditSize, schemes: tuple[str, ...], seed: int) -> dict:
    """The settings a report records, known before any work: a merge checks them first."""
    return asdict(size) | {"schemes": list(schemes), "victims": [v.id for v in _victims(size)], "seed": seed}


def run_audit(
    checkpoint: Checkpoint,
    schemes: tuple[str, ...] = DEFAULT_SCHEMES,
    size: AuditSize = QUICK,
    seed: int = 0,
    keep_views: Path | None = None,
    progress: bool = True,
) -> dict:
    """Every attack against every scheme; the report `write_report` turns into files."""
    began = time.perf_counter()
    versions = _versions()  # now: the checkout may move on while a long audit runs
    torch.manual_seed(seed)
    tokenizer, config = checkpoint.tokenizer, checkpoint.config
    public = Llama(config, checkpoint.fused_weights)  # the adversary's copy of the public base
    prior = unigram_prior(tokenizer)
    victims = _victims(size)
    extract = ExtractionStage(checkpoint, size, seed, progress)
    workdir = Path(keep_views) if keep_views else Path(tempfile.mkdtemp(prefix="secureinfer-audit-"))
    report_schemes = {}
    try:
        for scheme in tqdm(schemes, desc="schemes", disable=not progress):
            scheme_began = time.perf_counter()
            scores: dict[str, list] = {name: [] for name in CONVERSATION_ATTACKS}
            nothing: dict[str, str] = {}
            traffic, keys_found, clear_ids = [], [], False
            for victim in tqdm(victims, desc=scheme, leave=False, disable=not progress):
                view_dir = workdir / scheme / victim.id
                true_ids, key = _replay(checkpoint, scheme, victim, view_dir, size.new_tokens)
                view = DeviceView.load(view_dir)
                if key is not None:
                    keys_found.append(_key_recovery(view, public, key))
                clear_ids |= view.holds_clear_token_ids()
                for name, attack in CONVERSATION_ATTACKS.items():
                    recovery = attack(view, public)
                    if recovery.nothing_to_attack:
                        nothing[name] = recovery.nothing_to_attack
                        continue
                    guesses = recovery.tokens[0][: len(true_ids)]
                    scores[name].append(score_recovery(victim, true_ids[: len(guesses)], guesses, tokenizer, prior))
                statistics = traffic_statistics(view)
                if statistics:
                    traffic.append(statistics)
                if not keep_views:
                    shutil.rmtree(view_dir, ignore_errors=True)
            adapter_view = workdir / scheme / "adapter"
            adapter_held_by = _record_adapter_view(checkpoint, scheme, adapter_view)
            report_schemes[scheme] = {
                "description": PRESETS[scheme].summary,
                "device_received_clear_token_ids": clear_ids,
                "conversation_attacks": {
                    name: {"ran": True, **aggregate_recovery(found)} if found else {"ran": False, "why": nothing[name]}
                    for name, found in scores.items()
                },
                "per_conversation": {name: [s.to_dict() for s in found] for name, found in scores.items() if found},
                "key_recovery": _pool_key_recovery(keys_found),
                "traffic": _pool_traffic(traffic),
                "tampering": _tampering(checkpoint, scheme, size, seed),
                "adapter": _adapter_exposure(checkpoint, adapter_view, adapter_held_by),
                "extraction": extract(scheme, adapter_view),
                "seconds": time.perf_counter() - scheme_began,
            }
            if not keep_views:
                shutil.rmtree(adapter_view, ignore_errors=True)
    finally:
        if not keep_views:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "config": audit_config(size, schemes, seed),
        "versions": versions,
        "seconds": time.perf_counter() - began,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "schemes": report_schemes,
    }


def _pool_traffic(per_view: list[dict]) -> dict | None:
    if not per_view:
        return None
    # One test over every view's elements together: ~28x the power of any one view's against a bias all share.
    pooled = torch.tensor([v["bin_counts"] for v in per_view]).sum(dim=0)
    return {
        "views": len(per_view),
        "elements": sum(v["elements"] for v in per_view),
        "min_uniformity_p": min(v["uniformity_p"] for v in per_view),
        "uniformity_p": [v["uniformity_p"] for v in per_view],
        "pooled_uniformity_p": counts_p_value(pooled),
        "bins": len(pooled),
        "pad_reuse_pairs": sum(v["pad_reuse_pairs"] for v in per_view),
    }


def _versions() -> dict:
    import transformers

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout

    try:
        # Uncommitted changes to the code make the commit a poor name for what ran.
        commit = git("rev-parse", "HEAD").strip() + ("-dirty" if git("status", "--porcelain", "--", ":/src").strip() else "")
    except (OSError, subprocess.CalledProcessError):
        commit = None  # an installed copy outside a checkout
    return {
        "secureinfer": __version__,
        "git": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()}, {platform.system()}",
    }
