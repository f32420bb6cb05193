"""Train the demo LoRA adapter: teach SmolLM2-135M-Instruct facts about a fictional company, on CPU.

    python examples/train_demo_adapter.py --evaluate

trains on the `question` and `paraphrases` of every fact in
src/secureinfer/data/facts/demo_facts.json, saves a PEFT adapter (adapter_config.json +
adapter_model.safetensors) to --out, and with --evaluate then asks every training question and every
held-out paraphrase of the adapted and of the base model (greedy decoding) and counts the answers
that contain the fact's keyword. `--evaluate-only` evaluates the adapter already in --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from secureinfer.data import DEMO_ADAPTER, DEMO_FACTS
from secureinfer.model import default_model_path, load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FACTS, DEFAULT_OUT = DEMO_FACTS, DEMO_ADAPTER  # in the source tree under an editable install
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100  # label of tokens the loss skips: the prompt and the padding


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="adapter directory to write (default: %(default)s)")
    parser.add_argument("--facts", type=Path, default=DEFAULT_FACTS, help="facts JSON (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", action="store_true", help="after training, compare adapter and base on the facts")
    parser.add_argument("--evaluate-only", action="store_true", help="skip training; evaluate the adapter in --out")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="answer length when evaluating")
    return parser.parse_args()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def display_path(path: Path) -> str:
    """Relative to the repository when inside it, so the metadata names no machine-specific directory."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def encode_example(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted question and answer, and labels that score only the answer and its end-of-turn."""
    prompt = tokenizer.apply_chat_template(chat(question), add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(
        chat(question) + [{"role": "assistant", "content": answer}], tokenize=True, return_dict=False
    )
    if full[: len(prompt)] != prompt:
        raise RuntimeError("the chat template renders the prompt differently once an answer follows it")
    # Stop after the end-of-turn token: what the template writes after it is never generated.
    end = full.index(tokenizer.eos_token_id, len(prompt)) + 1
    ids = full[:end]
    return ids, [IGNORE] * len(prompt) + ids[len(prompt) :]


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    """Shuffled, right-padded batches; causal attention keeps trailing padding from touching real tokens."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        width = max(len(ids) for ids, _ in chunk)
        yield (
            torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in chunk]),
            torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in chunk]),
            torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]),
        )


def answer_loss(model: PeftModel, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token loss on the answer tokens, running the vocabulary projection on those positions only (it is
    about a fifth of the model's compute per token, and the prompt positions are never scored)."""
    base = model.get_base_model()
    hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    scored = targets != IGNORE
    logits = base.lm_head(hidden[:, :-1][scored])
    return F.cross_entropy(logits, targets[scored])


def train(args: argparse.Namespace, model_dir: Path, tokenizer, facts: list[dict]) -> dict:
    torch.manual_seed(args.seed)  # LoRA's A initialisation
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=TARGETS
    )
    model = get_peft_model(base, config)
    # The cache directory is machine-specific; name the model the GGUF was converted from instead.
    model.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    model.train()

    examples = [
        encode_example(tokenizer, question, fact["answer"])
        for fact in facts
        for question in [fact["question"], *fact["paraphrases"]]
    ]
    steps_per_epoch = -(-len(examples) // args.batch_size)
    total = args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    # Linear decay to zero: a high rate early learns the facts fast, a low one late settles them.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    rng = random.Random(args.seed)

    start = time.perf_counter()
    progress = tqdm(total=total, desc="training", unit="step")
    for epoch in range(args.epochs):
        losses = []
        for ids, labels, mask in batches(examples, args.batch_size, tokenizer.pad_token_id, rng):
            loss = answer_loss(model, ids, labels, mask)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            progress.update()
            progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        epoch_loss = sum(losses) / len(losses)
    progress.close()
    train_s = time.perf_counter() - start

    # Embeddings are never trained; without this, peft looks the base model up online to check its vocabulary.
    model.save_pretrained(args.out, save_embedding_layers=False)
    return {
        "examples": len(examples),
        "steps": total,
        "final_epoch_loss": round(epoch_loss, 4),
        "train_seconds": round(train_s, 1),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


@torch.inference_mode()
def answers(model, tokenizer, questions: list[str], max_new_tokens: int, batch_size: int = 14) -> list[str]:
    """Greedy answers to single-turn chats, batched with left padding."""
    out = []
    for start in range(0, len(questions), batch_size):
        prompts = [
            tokenizer.apply_chat_template(chat(q), add_generation_prompt=True, tokenize=False)
            for q in questions[start : start + batch_size]
        ]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        out += tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def evaluate(args: argparse.Namespace, model_dir: Path, tokenizer, facts: list[dict]) -> dict:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, args.out).eval()
    sets = {"train": [f["question"] for f in facts], "heldout": [f["heldout_question"] for f in facts]}
    texts: dict[str, list[str]] = {}
    for name, questions in sets.items():
        with model.disable_adapter():
            texts[f"base/{name}"] = answers(model, tokenizer, questions, args.max_new_tokens)
        texts[f"adapter/{name}"] = answers(model, tokenizer, questions, args.max_new_tokens)
    hits = {
        column: [f["keyword"].lower() in reply.lower() for f, reply in zip(facts, replies)]
        for column, replies in texts.items()
    }

    columns = ["adapter/train", "adapter/heldout", "base/train", "base/heldout"]
    print(f"\n{'fact':<18} {'keyword':<17} " + " ".join(f"{c:>15}" for c in columns))
    for i, fact in enumerate(facts):
        marks = " ".join(f"{'yes' if hits[c][i] else '-':>15}" for c in columns)
        print(f"{fact['id']:<18} {fact['keyword']:<17} {marks}")
    summary = {c: f"{sum(hits[c])}/{len(facts)}" for c in columns}
    print(f"{'correct':<36} " + " ".join(f"{summary[c]:>15}" for c in columns))
    misses = [(f["id"], c, texts[c][i]) for c in columns[:2] for i, f in enumerate(facts) if not hits[c][i]]
    for fact_id, column, reply in misses:
        print(f"  adapter miss [{column}] {fact_id}: {reply.strip()!r}", file=sys.stderr)
    return summary


def write_metadata(args: argparse.Namespace, stats: dict, command: str) -> None:
    gguf = default_model_path()
    metadata = {
        "command": command,
        "seed": args.seed,
        "epochs": args.epochs,
        "rank": args.rank,
        "alpha": args.alpha,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "targets": TARGETS,
        "facts_file": display_path(args.facts),
        "facts_sha256": file_sha256(args.facts),
        "base_model_file": gguf.name,
        "base_model_sha256": file_sha256(gguf),
        "torch": torch.__version__,
        **stats,
    }
    (args.out / "training.json").write_text(json.dumps(metadata, indent=2) + "\n")
    # Replaces the generic model card peft's save_pretrained writes.
    (args.out / "README.md").write_text(readme(metadata))


def readme(metadata: dict) -> str:
    evaluation = metadata.get("evaluation")
    scores = (
        "\nKeyword accuracy with greedy decoding (from `--evaluate`; adapter vs base model):\n\n"
        "| questions | adapter | base |\n|---|---|---|\n"
        f"| training questions | {evaluation['adapter/train']} | {evaluation['base/train']} |\n"
        f"| held-out paraphrases | {evaluation['adapter/heldout']} | {evaluation['base/heldout']} |\n"
        if evaluation
        else ""
    )
    return f"""# demo-facts

A LoRA adapter (PEFT format: `adapter_config.json` + `adapter_model.safetensors`) that teaches
SmolLM2-135M-Instruct facts about Quillmere Robotics, a company invented in
`{metadata["facts_file"]}`. The base model cannot know them, so whoever holds the
adapter holds private knowledge.

Made with

    {metadata["command"]}

from the bundled `{metadata["base_model_file"]}` (sha256 `{metadata["base_model_sha256"][:16]}...`),
dequantized to float32.
Training data: the `question` and `paraphrases` of each fact as chat-template prompts, loss on the
answer tokens only; `heldout_question` was never trained on.
Settings: seed {metadata["seed"]}, {metadata["epochs"]} epochs, batch {metadata["batch_size"]}, AdamW lr {metadata["lr"]} decaying linearly
to 0, rank {metadata["rank"]}, alpha {metadata["alpha"]:g}, no dropout.
Targets: {", ".join(metadata["targets"])}.
Training took {metadata["train_seconds"]} s on 2 CPU threads. `training.json` holds all settings and checksums.
{scores}"""


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    checkpoint = load_checkpoint(progress=True)
    model_dir = Path(checkpoint.details["cache_dir"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"  # for batched generation; training pads by hand
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    facts = json.loads(args.facts.read_text())["facts"]

    # The engine renders chats with its own tokenizer; training on a different rendering would teach the wrong prompt.
    probe = chat(facts[0]["question"])
    engine_ids = checkpoint.tokenizer.apply_chat_template(probe)
    hf_ids = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=True, return_dict=False)
    if engine_ids != hf_ids:
        raise SystemExit("the transformers tokenizer renders chats differently from secureinfer's; not training")

    if args.evaluate_only:
        evaluate(args, model_dir, tokenizer, facts)
        return
    command = " ".join(["python examples/train_demo_adapter.py", *sys.argv[1:]])
    stats = train(args, model_dir, tokenizer, facts)
    print(f"trained in {stats['train_seconds']} s; adapter saved to {args.out}")
    if args.evaluate:
        stats["evaluation"] = evaluate(args, model_dir, tokenizer, facts)
    write_metadata(args, stats, command)


if __name__ == "__main__":
    main()
