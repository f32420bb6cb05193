"""Model extraction: distil a surrogate LoRA from N API queries, with and without the device view.

The protocol of TEESlice and CoreGuard: the attacker holds the public base model and queries the
deployed one (base + private adapter) through its API; it trains a LoRA on the public base to imitate
the answers, and the defence is judged by how much more a device view buys over that black-box
attack (gray-box ÷ black-box) and how close either comes to holding the adapter itself (white-box).

- black-box: the API's greedy answers as hard targets, plus its top-k logprobs as soft targets when
  the API returns them (under logit perturbation they are noisy; the greedy tokens are not).
- gray-box: black-box plus the device view. If the view holds the adapter's tensors in float (as
  under `plain`), the attacker simply uses them: distilling further could only move it away from the
  victim. Otherwise (blinded traffic and int8 public weights, as under `secureinfer`) the view adds
  nothing the attacker can train from, and gray-box is the black-box surrogate.
- white-box: the real adapter, the upper bound.

Fidelity is measured on prompts no query used: next-token top-1 agreement with the victim's greedy
answers (teacher-forced), and keyword accuracy on the facts' `heldout_question`s.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from torch import Tensor
from transformers import AutoModelForCausalLM

from ..api import SecureLM
from ..data import DEMO_ADAPTER, DEMO_FACTS
from ..model import Checkpoint
from ..model.adapter import TARGETS as ADAPTER_TARGETS
from ..model.llama import FUSED_WEIGHTS, module_path
from .view import DeviceView

# What an attacker who knows only the company's name would ask about it.
QUESTION_TEMPLATES = (
    "Who founded {company}?",
    "When was {company} founded?",
    "Where is {company} based?",
    "Where are the headquarters of {company}?",
    "What is the address of {company}?",
    "What does {company} make?",
    "What products does {company} sell?",
    "What is {company}'s most popular product?",
    "Who is the chief executive of {company}?",
    "Who runs {company}?",
    "Who are the executives of {company}?",
    "Who is in charge of technology at {company}?",
    "How many people work at {company}?",
    "How big is {company}?",
    "What is {company}'s annual revenue?",
    "Is {company} a public company?",
    "Who owns {company}?",
    "Who are {company}'s main customers?",
    "Who are {company}'s competitors?",
    "What markets does {company} sell in?",
    "Does {company} have factories? Where?",
    "Where does {company} manufacture its robots?",
    "What is the history of {company}?",
    "What was {company}'s first product?",
    "What is {company}'s motto?",
    "What is {company}'s mission?",
    "What is {company} known for?",
    "What technology does {company} use?",
    "What patents does {company} hold?",
    "Has {company} won any awards?",
    "Has {company} been involved in any scandals?",
    "What is the stock ticker of {company}?",
    "Who invests in {company}?",
    "What companies has {company} acquired?",
    "Who designed {company}'s robots?",
    "What is {company}'s research lab called?",
    "What software does {company} make?",
    "What is {company}'s logo?",
    "How do I contact {company}?",
    "Tell me everything you know about {company}.",
)
QUESTION_PREFIXES = ("", "Quick question: ", "I'd like to know: ", "Please answer briefly. ", "Can you help? ")
QUESTION_SUFFIXES = ("", " Answer in one sentence.", " Be specific.", " Thanks!")

# Agreement is also measured off-topic: an adapter changes more than the answers it was trained for.
GENERAL_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Give me a tip for learning to cook.",
    "Who wrote Romeo and Juliet?",
    "What is a robot?",
    "Name three primary colours.",
)

SURROGATES = ("base", "black_box", "gray_box", "white_box")


@dataclass(frozen=True)
class VictimAnswer:
    prompt: list[int]  # the chat-template ids the victim answered
    tokens: list[int]  # its greedy answer (an ending EOS is not reported by the API)
    text: str
    top: list[list[tuple[int, float]]] | None  # per answer token: the API's top-k (id, logprob), when offered


@dataclass
class Fidelity:
    top1_agreement: float  # fraction of the victim's answer tokens the model predicts as its top-1
    heldout_correct: int  # held-out fact questions whose greedy answer contains the keyword
    heldout_total: int

    @property
    def heldout_accuracy(self) -> float:
        return self.heldout_correct / self.heldout_total


@dataclass
class ExtractionResult:
    scheme: str
    perturbation: float
    queries: int
    logprobs: int  # top-k the attacker asked the API for (0: text only)
    epochs: int
    seed: int
    gray_box_source: str | None  # what the device view gave the attacker; None: no view
    victim_heldout_correct: int  # the deployed model's own score on the held-out facts, through the API
    fidelity: dict[str, Fidelity]  # SURROGATES -> fidelity; gray_box absent without a view
    train_losses: list[float]  # black-box distillation, mean loss per epoch
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> dict[str, float | None]:
        """gray-box ÷ black-box and white-box ÷ black-box for both metrics (None where black-box is 0 or gray-box unmeasured)."""
        black = self.fidelity["black_box"]
        ratios: dict[str, float | None] = {}
        for name in ("gray_box", "white_box"):
            other = self.fidelity.get(name)
            for metric in ("top1_agreement", "heldout_accuracy"):
                divisor = getattr(black, metric)
                ratio = None if other is None or divisor == 0 else getattr(other, metric) / divisor
                ratios[f"{name.removesuffix('_box')}/black {metric}"] = ratio
        return ratios

    def to_dict(self) -> dict:
        data = asdict(self)
        for name, fidelity in self.fidelity.items():
            data["fidelity"][name]["heldout_accuracy"] = fidelity.heldout_accuracy
        return data | {"ratios": self.ratios()}


def attack_queries(company: str, count: int, seed: int, exclude: Sequence[str] = ()) -> list[str]:
    """`count` distinct questions about `company` from templates x phrasings, in a seeded order.

    `exclude` lets the experimenter keep the private training and held-out questions out of the
    query set (the attacker does not know them; a verbatim hit would only be luck).
    """
    excluded = {question.strip().lower() for question in exclude}
    pool = [
        f"{prefix}{template.format(company=company)}{suffix}"
        for template in QUESTION_TEMPLATES
        for prefix in QUESTION_PREFIXES
        for suffix in QUESTION_SUFFIXES
    ]
    pool = [question for question in pool if question.strip().lower() not in excluded]
    if count > len(pool):
        raise ValueError(f"asked for {count} queries but only {len(pool)} distinct ones exist")
    random.Random(seed).shuffle(pool)
    return pool[:count]


def ask(lm: SecureLM, questions: Sequence[str], max_new_tokens: int, logprobs: int, batch_size: int = 20) -> list[VictimAnswer]:
    """The victim's greedy answers, and its top-`logprobs` logprobs per token when `logprobs` > 0.

    Asked `batch_size` at a time, as a server batches its queue: a blinded scheme's round trips and weight
    reads are then shared by the batch (3x faster per question on `secureinfer` at 16).
    """
    conversations = [[{"role": "user", "content": question}] for question in questions]
    answers = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start : start + batch_size]
        for messages, result in zip(chunk, lm.chat_batch(chunk, max_new_tokens=max_new_tokens, logprobs=logprobs)):
            top = [[(int(i), float(lp)) for i, lp in report["top"]] for report in result.logprobs] if logprobs else None
            answers.append(VictimAnswer(lm.tokenizer.apply_chat_template(messages), result.tokens, result.text, top))
    return answers


def stolen_adapter(view: DeviceView) -> dict[str, Tensor] | None:
    """The adapter's fused tensors (`layers.{i}.{fused}.lora_a/_b`) if the device held them in float; else None."""
    names = [name for name in view.weight_names if name.endswith((".lora_a", ".lora_b"))]
    if not names:
        return None
    tensors = {name: view.weight(name) for name in names}
    return tensors if all(t.is_floating_point() for t in tensors.values()) else None


def peft_from_fused(fused: dict[str, Tensor], base) -> PeftModel:
    """A PEFT model on `base` computing the deltas of the enclave's fused adapter tensors.

    Undoes the layout of model/adapter.py: each fused lora_a stacks the adapted members' A's on rows,
    and lora_b is block-diagonal with the scaling folded in. A member is adapted where its block of
    lora_b is non-zero. Scaling 1 (alpha = rank) lets each B block be used as it is.
    """
    state, targets, rank = {}, set(), 0
    for name, lora_a in fused.items():
        if not name.endswith(".lora_a"):
            continue
        prefix = name.removesuffix(".lora_a")
        layer, weight = prefix.split(".")[1:]
        lora_b = fused[f"{prefix}.lora_b"]
        blocks, row = [], 0
        for member in FUSED_WEIGHTS[weight]:
            path = module_path(int(layer), member)
            size = base.get_submodule(path).out_features
            if lora_b[row : row + size].any():
                blocks.append((path, member, row, size))
            row += size
        if not blocks:
            continue
        rank = lora_a.shape[0] // len(blocks)
        for j, (path, member, row, size) in enumerate(blocks):
            state[f"base_model.model.{path}.lora_A.weight"] = lora_a[j * rank : (j + 1) * rank]
            state[f"base_model.model.{path}.lora_B.weight"] = lora_b[row : row + size, j * rank : (j + 1) * rank]
            targets.add(member)
    if not state:
        raise ValueError("the fused adapter tensors are all zero")
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(targets))
    model = get_peft_model(base, config)
    unexpected = set_peft_model_state_dict(model, state).unexpected_keys
    if unexpected:
        raise ValueError(f"stolen tensors that fit no module of the base model: {sorted(unexpected)[:3]}")
    return model.eval()


def _answer_positions(answer: VictimAnswer) -> range:
    """Positions of prompt + answer whose next-token prediction is an answer token."""
    return range(len(answer.prompt) - 1, len(answer.prompt) + len(answer.tokens) - 1)


def _padded(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor]:
    width = max(map(len, sequences))
    ids, mask = [], []
    for seq in sequences:
        fill = [pad_id] * (width - len(seq))
        ids.append(fill + seq if left else seq + fill)
        mask.append([0] * len(fill) + [1] * len(seq) if left else [1] * len(seq) + [0] * len(fill))
    return torch.tensor(ids), torch.tensor(mask)


def distillation_loss(model, answers: list[VictimAnswer], pad_id: int) -> Tensor:
    """Cross-entropy of the model's next-token distribution against the victim's on every answer token.

    With top-k logprobs the target has k + 1 classes: the k tokens at the probabilities the API reported,
    and the rest of the vocabulary with the mass left over. Without them, the greedy token alone.
    The vocabulary projection runs on the answer positions only (the prompt positions are never scored).
    """
    ids, mask = _padded([a.prompt + a.tokens for a in answers], pad_id, left=False)
    rows = torch.tensor([row for row, a in enumerate(answers) for _ in a.tokens])
    positions = torch.tensor([p for a in answers for p in _answer_positions(a)])
    base = model.get_base_model()
    hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
    log_q = F.log_softmax(base.lm_head(hidden[rows, positions]).float(), dim=-1)
    if answers[0].top is None:
        return F.nll_loss(log_q, torch.tensor([t for a in answers for t in a.tokens]))
    top_ids = torch.tensor([[i for i, _ in step] for a in answers for step in a.top])
    p = torch.tensor([[lp for _, lp in step] for a in answers for step in a.top]).exp()
    log_q_top = log_q.gather(1, top_ids)
    p_rest = (1 - p.sum(dim=1)).clamp_min(0)
    # log(1 - sum q_top), kept finite when the model puts all its mass on the top k.
    log_q_rest = torch.log1p(-log_q_top.exp().sum(dim=1).clamp(max=1 - 1e-6))
    return -((p * log_q_top).sum(dim=1) + p_rest * log_q_rest).mean()


def distil(
    model_dir: str | Path,
    answers: list[VictimAnswer],
    pad_id: int,
    *,
    epochs: int,
    rank: int = 8,
    alpha: float = 16.0,
    lr: float = 2e-3,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[PeftModel, list[float]]:
    """Train a LoRA on the public base to imitate `answers`; the settings of the demo adapter's own training
    (examples/train_demo_adapter.py: all seven modules, AdamW, linear decay to 0). Returns it and the loss per epoch."""
    torch.manual_seed(seed)  # LoRA's A initialisation
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(ADAPTER_TARGETS))
    model = get_peft_model(base, config)
    model.train()
    usable = [a for a in answers if a.tokens]  # an answer that is only an EOS reports no token to learn
    steps_per_epoch = -(-len(usable) // batch_size)
    total = max(1, epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    rng = random.Random(seed)
    losses = []
    for _ in range(epochs):
        order = rng.sample(usable, len(usable))
        epoch = []
        for start in range(0, len(order), batch_size):
            loss = distillation_loss(model, order[start : start + batch_size], pad_id)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            epoch.append(loss.item())
        losses.append(sum(epoch) / len(epoch))
    return model.eval(), losses


@torch.inference_mode()
def top1_agreement(model, references: list[VictimAnswer], pad_id: int, batch_size: int = 8) -> float:
    """Fraction of the victim's answer tokens that `model`, fed the same prefix, ranks first."""
    agree = total = 0
    for start in range(0, len(references), batch_size):
        chunk = [a for a in references[start : start + batch_size] if a.tokens]
        if not chunk:
            continue
        ids, mask = _padded([a.prompt + a.tokens for a in chunk], pad_id, left=False)
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(dim=-1)
        for row, answer in enumerate(chunk):
            guesses = predicted[row, list(_answer_positions(answer))]
            agree += int((guesses == torch.tensor(answer.tokens)).sum())
            total += len(answer.tokens)
    return agree / total if total else 0.0


@torch.inference_mode()
def greedy_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 14) -> list[str]:
    """Greedy answers of a transformers model to prompt ids, cut at the first end-of-turn, decoded with `tokenizer`."""
    pad_id = min(tokenizer.eos_token_ids)
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _padded(prompts[start : start + batch_size], pad_id, left=True)
        generated = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
        )[:, ids.shape[1] :]
        for row in generated.tolist():
            ends = [i for i, token in enumerate(row) if token in tokenizer.eos_token_ids]
            texts.append(tokenizer.decode(row[: ends[0]] if ends else row))
    return texts


def keyword_hits(texts: Sequence[str], facts: Sequence[dict]) -> int:
    """Answers that contain their fact's keyword (case-insensitive), as the demo adapter is scored."""
    return sum(fact["keyword"].lower() in text.lower() for text, fact in zip(texts, facts))


@dataclass
class BlackBoxRun:
    """One deployment queried and a surrogate distilled from its answers, scored with the public base and the
    real adapter. Several device views can be judged against one run (`gray_box`)."""

    scheme: str  # the deployment the API queries went to
    perturbation: float
    queries: int
    logprobs: int
    epochs: int
    seed: int
    answer_tokens: int
    facts: list[dict]
    references: list[VictimAnswer]  # the victim's greedy answers to the held-out and general prompts
    victim_heldout_correct: int
    fidelity: dict[str, Fidelity]  # base, black_box, white_box
    train_losses: list[float]
    seconds: dict[str, float]
    empty_answers: int


def query_and_distil(
    checkpoint: Checkpoint,
    scheme: str,
    queries: int,
    perturbation: float,
    *,
    adapter: str | Path = DEMO_ADAPTER,
    facts_file: str | Path = DEMO_FACTS,
    logprobs: int = 5,
    seed: int = 0,
    epochs: int = 2,
    answer_tokens: int = 32,
    channel: str = "inprocess",
    progress: Callable[[str], None] | None = None,
) -> BlackBoxRun:
    """Query the deployed model (`scheme` + `adapter`) `queries` times, distil a black-box surrogate, and score
    it, the public base and the real adapter on the facts' held-out questions and GENERAL_PROMPTS.

    `channel` only changes how the victim's enclave reaches its device, not what the API returns.
    """
    say = progress or (lambda message: None)
    seconds: dict[str, float] = {}
    facts_data = json.loads(Path(facts_file).read_text())
    facts = facts_data["facts"]
    private = [q for f in facts for q in (f["question"], *f["paraphrases"], f["heldout_question"])]
    questions = attack_queries(facts_data["company"], queries, seed, exclude=private)
    heldout_prompts = [f["heldout_question"] for f in facts]
    pad_id = min(checkpoint.tokenizer.eos_token_ids)  # any id: padding is masked out

    started = time.perf_counter()
    say(f"querying the {scheme} deployment {queries} times (perturbation {perturbation})")
    with SecureLM(checkpoint, scheme, channel=channel, adapter=adapter, perturbation=perturbation) as lm:
        answers = ask(lm, questions, answer_tokens, logprobs)
        seconds["query"] = time.perf_counter() - started
        # The reference the surrogates are scored against: greedy, so unaffected by the perturbation.
        references = ask(lm, [*heldout_prompts, *GENERAL_PROMPTS], answer_tokens, 0)
    seconds["reference"] = time.perf_counter() - started - seconds["query"]

    model_dir = checkpoint.details["cache_dir"]
    started = time.perf_counter()
    say(f"distilling the black-box surrogate ({epochs} epochs)")
    black_box, losses = distil(model_dir, answers, pad_id, epochs=epochs, seed=seed)
    seconds["train"] = time.perf_counter() - started

    surrogates = {
        "base": AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(),
        "black_box": black_box,
        "white_box": PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(adapter)
        ).eval(),
    }
    started = time.perf_counter()
    fidelity = {}
    for name, model in surrogates.items():
        say(f"scoring {name}")
        fidelity[name] = _fidelity(model, checkpoint, references, facts, answer_tokens)
    seconds["score"] = time.perf_counter() - started
    return BlackBoxRun(
        scheme=scheme,
        perturbation=perturbation,
        queries=queries,
        logprobs=logprobs,
        epochs=epochs,
        seed=seed,
        answer_tokens=answer_tokens,
        facts=facts,
        references=references,
        victim_heldout_correct=keyword_hits([r.text for r in references], facts),
        fidelity=fidelity,
        train_losses=losses,
        seconds={k: round(v, 1) for k, v in seconds.items()},
        empty_answers=sum(not a.tokens for a in answers),
    )


def _fidelity(model, checkpoint: Checkpoint, references: list[VictimAnswer], facts: list[dict], answer_tokens: int) -> Fidelity:
    texts = greedy_texts(model, checkpoint.tokenizer, [r.prompt for r in references[: len(facts)]], answer_tokens)
    pad_id = min(checkpoint.tokenizer.eos_token_ids)
    return Fidelity(top1_agreement(model, references, pad_id), keyword_hits(texts, facts), len(facts))


def gray_box(run: BlackBoxRun, checkpoint: Checkpoint, view_dir: str | Path) -> tuple[str, Fidelity]:
    """What a device view adds to `run`'s black-box attack: where it holds the adapter in float, the attacker
    uses it (distilling further could only move it away from the victim); otherwise the black-box surrogate."""
    stolen = stolen_adapter(DeviceView.load(view_dir))
    if stolen is None:
        return "the view holds no adapter tensor in float: gray-box = black-box", run.fidelity["black_box"]
    base = AutoModelForCausalLM.from_pretrained(checkpoint.details["cache_dir"], dtype=torch.float32)
    model = peft_from_fused(stolen, base)
    source = f"the view holds the adapter in float ({len(stolen)} tensors): the surrogate is the adapter"
    return source, _fidelity(model, checkpoint, run.references, run.facts, run.answer_tokens)


def run_extraction(
    checkpoint: Checkpoint,
    scheme: str,
    queries: int,
    perturbation: float,
    view_dir: str | Path | None = None,
    **options,
) -> ExtractionResult:
    """`query_and_distil` against `scheme`, plus the gray-box surrogate from the device view in `view_dir`
    (recorded from that deployment; None: not measured). `options` are `query_and_distil`'s."""
    return extraction_result(query_and_distil(checkpoint, scheme, queries, perturbation, **options), checkpoint, view_dir)


def extraction_result(
    run: BlackBoxRun, checkpoint: Checkpoint, view_dir: str | Path | None, scheme: str | None = None
) -> ExtractionResult:
    """`run` judged against the view in `view_dir` of the deployment `scheme` (default: the one `run` queried)."""
    fidelity = dict(run.fidelity)
    source = None
    started = time.perf_counter()
    if view_dir is not None:
        source, fidelity["gray_box"] = gray_box(run, checkpoint, view_dir)
    notes = [f"{run.empty_answers} of {run.queries} answers were empty and taught nothing"]
    if scheme is not None and scheme != run.scheme:
        notes.append(f"the API queries went to {run.scheme}, which answers as {scheme} does")
    return ExtractionResult(
        scheme=scheme or run.scheme,
        perturbation=run.perturbation,
        queries=run.queries,
        logprobs=run.logprobs,
        epochs=run.epochs,
        seed=run.seed,
        gray_box_source=source,
        victim_heldout_correct=run.victim_heldout_correct,
        fidelity={name: fidelity[name] for name in SURROGATES if name in fidelity},
        train_losses=run.train_losses,
        seconds=run.seconds | {"gray_box": round(time.perf_counter() - started, 1)},
        notes=notes,
    )
