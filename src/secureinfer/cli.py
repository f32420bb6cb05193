"""The `secureinfer` command line. Every user error prints one line (problem; fix) and exits 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .channel.base import DeviceError
from .errors import IntegrityError, InvalidRequestError, SecureInferError
from .plan import PRESETS

# The conversation attacks of attacks/audit.py, as the command line spells them, and the traffic statistics.
ATTACK_NAMES = (
    "kv-inversion", "hidden-state-inversion", "vocab-matching", "vocab-matching-sorted", "blinded-nearest-embedding",
    "kv-inversion-after-key-recovery", "attention-score-matching", "traffic",
)  # fmt: skip


EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming the problem and the fix, not a usage dump."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _bounded(kind: Callable, rule: str, check: Callable) -> Callable:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        return value

    parse.__name__ = rule  # argparse names the type in its messages
    return parse


positive_int = _bounded(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = _bounded(int, "an integer >= 0", lambda v: v >= 0)
temperature = _bounded(float, "a number >= 0 (0 is greedy)", lambda v: 0 <= v < float("inf"))
probability = _bounded(float, "a number in (0, 1]", lambda v: 0 < v <= 1)
non_negative_float = _bounded(float, "a number >= 0", lambda v: 0 <= v < float("inf"))
positive_seconds = _bounded(float, "a number of seconds > 0", lambda v: 0 < v < float("inf"))
share = _bounded(float, "a number in [0, 1)", lambda v: 0 <= v < 1)

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GIB": 1 << 30}


def protected_assets(text: str) -> set[str]:
    """The planner checks the names: the CLI does not keep a second list of assets."""
    return {a.strip() for a in text.split(",") if a.strip()}


def memory_size(text: str) -> int:
    """Bytes from '90MiB', '128M', '512GiB' or a plain integer."""
    number = text.rstrip("KMGiBkmgib")
    unit = text[len(number) :].upper()
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 90MiB, 128M or 1073741824") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size > 0")
    return int(value)


memory_size.__name__ = "a size like 90MiB"


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    """What every command that starts a device takes: the model, threads, and where the device runs."""
    p.add_argument("--model", help="a .gguf file, a .safetensors file or a transformers directory (default: bundled SmolLM2)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads per process (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--device", default="cpu", help="where the untrusted device computes: cpu (default) or cuda")
    p.add_argument("--channel", default="process", help="process (default: a separate device process) or inprocess")
    p.add_argument(
        "--enclave-share", type=share,
        help="share of each blinded product's columns the enclave multiplies itself while the device does the rest "
        "(default: 0.5 with a CPU device in its own process and int8 dot products, else 0)",
    )  # fmt: skip


def _add_model_options(p: argparse.ArgumentParser) -> None:
    _add_runtime_options(p)
    p.add_argument(
        "--scheme", default="plain",
        help=f"scheme: {', '.join(PRESETS)} (default: plain); see `secureinfer plan --scheme NAME`",
    )  # fmt: skip
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter directory, or `demo` for the bundled one")
    p.add_argument("--perturbation", type=non_negative_float, help="logit noise std shown to callers (default: the scheme's)")
    p.add_argument("--verify-repetitions", type=non_negative_int, help="Freivalds checks per blinded product (default: the scheme's)")
    p.add_argument("--seal-kv", action=argparse.BooleanOptionalAction, help="seal the KV cache past --epc on the device (default: the scheme's)")
    p.add_argument("--record-view", metavar="DIR", help="dump everything the device holds, receives and sends to DIR")
    p.add_argument("--epc", type=memory_size, help="enclave memory budget, e.g. 90MiB (default: no limit)")
    p.add_argument("--device-timeout", type=positive_seconds, default=60.0, help="seconds to wait for a device reply")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 (default) disables top-k")
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=non_negative_int, help="sampling seed; set it for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--logprobs", type=non_negative_int, default=0, help="with --json: top-N logprobs per token (max 20)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="secureinfer", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with text, tokens and timings")
    _add_model_options(gen)
    _add_generation_options(gen)
    gen.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="an interactive conversation (/reset clears it, /exit or EOF ends it)")
    chat.add_argument("--system", help="system message")
    _add_model_options(chat)
    _add_generation_options(chat)
    chat.set_defaults(run=_chat)

    info = commands.add_parser("info", help="describe a model file and how secureinfer reads it")
    info.add_argument("model", nargs="?", help="model path (default: bundled SmolLM2)")
    info.add_argument("--json", action="store_true")
    info.add_argument("--quiet", action="store_true", help="no progress bars")
    info.set_defaults(run=_info)

    plan = commands.add_parser(
        "plan",
        help="print a scheme's placement table and analytic per-token costs; with --epc or --protect, search for "
        "the fastest placement that leaks no protected asset and fits the enclave",
    )
    plan.add_argument("--scheme", default="plain")
    plan.add_argument("--epc", type=memory_size, help="planner: the enclave memory budget, e.g. 96MiB")
    plan.add_argument("--protect", type=protected_assets, help="planner: assets to keep from the device: adapters,conversation")
    plan.add_argument("--adapter-rank", type=positive_int, default=8, help="planner: rank of the assumed adapter on every projection")
    plan.add_argument("--out", help="planner: also write the JSON result to this file")
    plan.add_argument("--model", help="model whose shapes to cost (default: bundled SmolLM2)")
    plan.add_argument("--context", type=positive_int, default=256, help="cached positions for the decode costs")
    plan.add_argument(
        "--enclave-share", type=share, default=0.0,
        help="share of each blinded product's columns the enclave multiplies itself (default 0: the scheme as "
        "published; a CPU device in its own process runs with 0.5 unless told otherwise)",
    )  # fmt: skip
    plan.add_argument("--json", action="store_true")
    plan.add_argument("--quiet", action="store_true", help="no progress bars")
    plan.set_defaults(run=_plan)

    bench = commands.add_parser(
        "bench", help="time our engine, transformers and each scheme side by side in one run"
    )
    _add_runtime_options(bench)
    bench.add_argument("--scheme", action="append", help="scheme to time (repeatable; default: every scheme)")
    bench.add_argument("--max-new-tokens", type=positive_int, default=64)
    bench.add_argument("--repeats", type=positive_int, default=5)
    lengths = _bounded(
        lambda text: tuple(int(part) for part in text.split(",")), "a comma list of integers >= 1, like 32,128,512",
        lambda values: min(values) >= 1,
    )  # fmt: skip
    bench.add_argument("--prompt-lengths", type=lengths, help="sweep: prompts of exactly these token counts, cut from the shipped text")
    bench.add_argument("--gen-lengths", type=lengths, help="sweep: new tokens per request (default: --max-new-tokens)")
    bench.add_argument(
        "--pads", choices=("online", "inline"), default="online",
        help="online (default): make a request's pads before timing it; inline: during it, end to end",
    )  # fmt: skip
    bench.add_argument("--scaling", action="store_true", help="analytic costs of LLaMA-2-shaped models of 58M-7B parameters; no timing")
    bench.add_argument(
        "--scaling-measured", action="store_true",
        help="with --scaling: also time plain, enclave, secureinfer and hardened on random-weight models of those shapes "
        "up to 1.5B parameters",
    )  # fmt: skip
    bench.add_argument("--plots", metavar="DIR", help="write PNG plots of the report to DIR")
    bench.add_argument("--json", action="store_true", help="print the full report as JSON")
    bench.add_argument("--out", help="also write the JSON report to this file")
    bench.set_defaults(run=_bench)

    quality = commands.add_parser(
        "quality", help="perplexity on a shipped text and greedy agreement of each scheme against fp32 plain"
    )
    _add_runtime_options(quality)
    quality.add_argument("--scheme", action="append", help="scheme to compare (repeatable; default: the bench's list)")
    quality.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter on every scheme, or `demo`")
    quality.add_argument("--text", help="UTF-8 text to score (default: the shipped evaluation text)")
    quality.add_argument("--window", type=positive_int, default=1024, help="tokens per perplexity window")
    quality.add_argument("--stride", type=positive_int, default=512, help="tokens between window starts")
    quality.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens per prompt")
    quality.add_argument("--json", action="store_true", help="print the full report as JSON")
    quality.add_argument("--out", help="also write the JSON report to this file")
    quality.set_defaults(run=_quality)

    attack = commands.add_parser(
        "attack",
        help="run one attack on a device view recorded with --record-view and print what it recovers (no ground "
        "truth needed; `audit` scores every attack against known conversations)",
    )
    attack.add_argument("name", choices=ATTACK_NAMES, metavar="ATTACK", help="one of: " + ", ".join(ATTACK_NAMES))
    attack.add_argument("view", metavar="VIEW", help="a directory recorded with --record-view")
    attack.add_argument("--model", help="the public base model the adversary holds (default: bundled SmolLM2)")
    attack.add_argument("--json", action="store_true", help="print the guessed ids and distances as JSON")
    attack.add_argument("--quiet", action="store_true", help="no progress bars")
    attack.set_defaults(run=_attack)

    audit = commands.add_parser(
        "audit", help="run every attack against every scheme from recorded device views; write the report"
    )
    audit.add_argument("--model", help="model to audit (default: bundled SmolLM2)")
    audit.add_argument("--quiet", action="store_true", help="no progress bars")
    audit.add_argument("--quick", action="store_true", help="CI size: 2 victims per scheme, 10 tampered runs per mode, no extraction")
    audit.add_argument("--scheme", action="append", help="scheme to audit (repeatable; default: plain, kvshield, kvmix, secureinfer, hardened)")
    audit.add_argument("--seed", type=non_negative_int, default=0)
    audit.add_argument("--out", default="report", help="directory for security.json, security.md and plots (default: report)")
    audit.add_argument("--readme", help="also regenerate the attack table between the markers of this README")
    audit.add_argument("--keep-views", metavar="DIR", help="keep every recorded device view under DIR")
    audit.add_argument(
        "--extraction-queries", type=non_negative_int,
        help="API queries per model-extraction attack (default: 100; 0 with --quick, which skips extraction)",
    )  # fmt: skip
    audit.add_argument(
        "--extraction-oracle", choices=("twin", "scheme"), default="twin",
        help="where extraction's API queries go: twin (default; plain-int8 for secureinfer and hardened, whose "
        "answers are bit-equal and cheaper to compute) or scheme (the scheme itself)",
    )  # fmt: skip
    audit.add_argument(
        "--extraction-only", action="store_true",
        help="run only model extraction and put it into the existing report in --out, replacing its extraction results",
    )
    audit.add_argument(
        "--update", action="store_true",
        help="put the audited schemes' results into the existing report in --out in place of theirs, keeping the "
        "other schemes' (the report must have the same size and seed; each scheme keeps the commit it ran at)",
    )
    audit.set_defaults(run=_audit)
    return parser


def _generation_options(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        logprobs=args.logprobs,
    )


def _load(args):
    from .api import load

    return load(
        args.model,
        args.scheme,
        threads=args.threads,
        progress=not args.quiet,
        channel=args.channel,
        device=args.device,
        record_view=args.record_view,
        epc_bytes=args.epc,
        device_timeout_s=args.device_timeout,
        adapter=args.adapter,
        perturbation=args.perturbation,
        verify_repetitions=args.verify_repetitions,
        seal_kv=args.seal_kv,
        enclave_share=args.enclave_share,
    )


def _generate(args) -> None:
    if not args.prompt.strip():
        raise SecureInferError("the prompt is empty", "pass some text to generate from")
    with _load(args) as lm:
        _generate_with(lm, args)


def _generate_with(lm, args) -> None:
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = system + [{"role": "user", "content": args.prompt}]
    elif args.system:
        raise SecureInferError("--system needs --chat", "add --chat, or drop --system")
    else:
        prompt = args.prompt
    stream = lm.stream(prompt, **_generation_options(args))
    for chunk in stream:
        if args.stream and not args.json:
            print(chunk, end="", flush=True)
    result = stream.result
    if args.json:
        print(json.dumps({**result.to_dict(), "scheme": lm.scheme, "boundary": lm.stats()}))
    else:
        print("" if args.stream else result.text)


def _chat(args) -> None:
    with _load(args) as lm:
        _chat_with(lm, args)


def _chat_with(lm, args) -> None:
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = list(system)
            print("(conversation cleared)")
            continue
        messages.append({"role": "user", "content": text})
        try:
            stream = lm.stream(messages, **_generation_options(args))
            print("assistant> ", end="", flush=True)
            for chunk in stream:
                print(chunk, end="", flush=True)
        except (DeviceError, IntegrityError) as exc:
            # The conversation lives here, in the trusted process: drop the failed turn, restart the device, go on.
            messages.pop()
            print(f"\nsecureinfer: error: {exc.problem}; the device was restarted, send the message again", file=sys.stderr)
            lm.restart_device()
            continue
        except SecureInferError:
            messages.pop()  # keep the conversation as it was before the rejected turn
            raise
        print()
        messages.append({"role": "assistant", "content": stream.result.text})


def _info(args) -> None:
    from .model import load_checkpoint

    checkpoint = load_checkpoint(args.model, progress=not args.quiet)

    cfg = checkpoint.config
    report = {
        "source": str(checkpoint.source),
        "format": checkpoint.format,
        "architecture": "llama",
        "parameters": cfg.num_parameters(),
        "config": cfg.to_dict(),
        "chat_template": checkpoint.tokenizer.has_chat_template,
        "tokenizer_vocab": checkpoint.tokenizer.vocab_size,
        "schemes": list(PRESETS),
        **{k: v for k, v in checkpoint.details.items()},
    }
    if args.json:
        print(json.dumps(report))
        return
    width = max(map(len, report))
    for key, value in report.items():
        if key == "config":
            for ckey, cvalue in value.items():
                print(f"  {ckey:<{width}}  {cvalue}")
        else:
            print(f"{key:<{width}}  {value}")


def _plan(args) -> None:
    if args.epc is not None or args.protect is not None:
        return _partition(args)
    from .model import load_checkpoint
    from .plan import PRESETS, build_plan
    from .plan.costs import plan_costs

    if args.scheme not in PRESETS:
        raise SecureInferError(f"unknown scheme {args.scheme!r}", f"use one of: {', '.join(PRESETS)}")
    config = load_checkpoint(args.model, progress=not args.quiet).config
    plan = build_plan(args.scheme, config).with_enclave_share(args.enclave_share)
    costs = plan_costs(plan, context=args.context)
    if args.json:
        described = {"scheme": plan.name, "enclave_share": plan.enclave_share, "placements": plan.describe()}
        print(json.dumps(described | {"costs": costs.to_dict()}))
        return
    print(f"scheme {plan.name}: {PRESETS[plan.name].summary}\n")
    if plan.blinded_weights:
        print(f"the enclave multiplies {plan.enclave_share:.0%} of each blinded product's columns itself\n")
    print(f"{'op':<14} {'placement':<40} transform")
    for row in plan.describe():
        print(f"{row['op']:<14} {row['placement']:<40} {row['transform']}")
    mib = 1 << 20
    print(f"\nper decode token at {costs.context} cached positions (analytic):")
    print(f"  enclave FLOPs        {costs.enclave_flops:,}")
    print(f"  device FLOPs         {costs.device_flops:,}")
    print(f"  round trips          {costs.round_trips}")
    print(f"  bytes to device      {costs.bytes_to_device:,}")
    print(f"  bytes from device    {costs.bytes_from_device:,}")
    print(f"  enclave resident     {costs.enclave_resident_bytes / mib:,.1f} MiB "
          f"(weights {costs.enclave_weight_bytes / mib:,.1f} + KV cache {costs.enclave_kv_bytes / mib:,.1f})")
    print(f"  device resident      {(costs.device_weight_bytes + costs.device_kv_bytes) / mib:,.1f} MiB")


def _partition(args) -> None:
    from .model import load_checkpoint
    from .plan.planner import NoPlacementFits, plan_partition, planner_table

    config = load_checkpoint(args.model, progress=not args.quiet).config
    try:
        result = plan_partition(
            config, args.epc, args.protect or set(), args.context, args.adapter_rank, enclave_share=args.enclave_share
        )
        failure = None
    except NoPlacementFits as error:
        result, failure = error.result, error
    report = result.to_json()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report) if args.json else planner_table(result))
    if failure is not None:
        raise failure


def _bench(args) -> None:
    if args.scaling_measured and not args.scaling:
        raise InvalidRequestError("--scaling-measured was given without --scaling", "add --scaling")
    if args.scaling:
        from .bench.analytic import run_scaling

        run_scaling(args)
        return
    from .bench.speed import run_speed_bench

    run_speed_bench(args)


def _quality(args) -> None:
    from .bench.quality import run_quality

    run_quality(args)


def _attack(args) -> None:
    from .attacks.audit import CONVERSATION_ATTACKS, traffic_statistics
    from .attacks.view import DeviceView
    from .model import Llama, load_checkpoint

    view = DeviceView.load(args.view)  # a wrong path fails before the model loads
    if args.name == "traffic":
        statistics = traffic_statistics(view)
        if statistics is None:
            print("nothing to attack: the device received no blinded tensor")
        else:
            print(json.dumps(statistics) if args.json else (
                f"{statistics['elements']:,} blinded field elements received; chi-square uniformity p = "
                f"{statistics['uniformity_p']:.3g}; {statistics['pad_reuse_pairs']} pairs of rows with a reused pad"
            ))  # fmt: skip
        return
    checkpoint = load_checkpoint(args.model, progress=not args.quiet)
    public = Llama(checkpoint.config, checkpoint.fused_weights)
    recovery = CONVERSATION_ATTACKS[args.name.replace("-", "_")](view, public)
    if args.json:
        print(json.dumps({
            "attack": recovery.attack, "method": recovery.method, "nothing_to_attack": recovery.nothing_to_attack,
            "tokens": recovery.tokens, "distances": recovery.distances, "used": recovery.used,
            "clear_token_ids": recovery.clear_token_ids, "notes": recovery.notes,
        }))  # fmt: skip
        return
    if recovery.nothing_to_attack:
        print(f"nothing to attack: {recovery.nothing_to_attack}")
        return
    print(f"{recovery.method}; read {', '.join(recovery.used[:4])}{' ...' if len(recovery.used) > 4 else ''}")
    for row, guesses in enumerate(recovery.tokens):
        ids = [token for token in guesses if token is not None]
        print(f"--- batch row {row}: {len(ids)} positions guessed")
        print(checkpoint.tokenizer.decode(ids))
    if recovery.clear_token_ids:
        print("(the device also received these token ids in clear)")


def _audit(args) -> None:
    from dataclasses import replace

    from .attacks.audit import DEFAULT_SCHEMES, FULL, QUICK, audit_config, run_audit, run_extraction_audit
    from .attacks.report import merge_reports, read_report, require_same_settings, security_table, update_readme, write_report
    from .model import load_checkpoint
    from .plan import build_plan

    schemes = tuple(dict.fromkeys(args.scheme or DEFAULT_SCHEMES))
    size = QUICK if args.quick else FULL
    queries = args.extraction_queries if args.extraction_queries is not None else size.extraction_queries
    size = replace(size, extraction_queries=queries, extraction_oracle=args.extraction_oracle)
    if args.extraction_only and args.update:
        raise InvalidRequestError("--extraction-only and --update together", "pass one: --update reruns whole schemes")
    if args.update:
        base = read_report(args.out)  # a missing, foreign or mismatched report fails here, before hours of work
        require_same_settings(base, audit_config(size, schemes, args.seed))
    if args.extraction_only:
        if not queries:
            raise InvalidRequestError("--extraction-only with no extraction queries", "pass --extraction-queries N (N > 0) or drop --quick")
        report = read_report(args.out)  # a missing or foreign report fails here, before minutes of work
        missing = [scheme for scheme in schemes if scheme not in report["schemes"]]
        if missing:
            raise InvalidRequestError(
                f"the report in {args.out} has no results for {', '.join(missing)}",
                "run the full audit for those schemes first, or pick --scheme among the report's",
            )
    checkpoint = load_checkpoint(args.model, progress=not args.quiet)
    for scheme in schemes:
        build_plan(scheme, checkpoint.config)  # an unknown scheme fails here, before minutes of work
    if args.extraction_only:
        for scheme, extraction in run_extraction_audit(checkpoint, schemes, size, args.seed, not args.quiet).items():
            report["schemes"][scheme]["extraction"] = extraction
    else:
        report = run_audit(checkpoint, schemes, size, args.seed, args.keep_views, not args.quiet)
        if args.update:
            report = merge_reports(base, report)
    files = write_report(report, args.out)
    if args.readme:
        update_readme(args.readme, report)
    print(security_table(report))
    print("wrote " + ", ".join(str(f) for f in files))


def _prepare_json_out(path: Path) -> None:
    """Make the folder of a command's --out file before the command's work, not after it: a bench that cannot
    write its report would otherwise lose minutes of measurements."""
    if path.is_dir():
        raise InvalidRequestError(f"--out {path} is a directory", "give the path of a JSON file to write, e.g. bench.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidRequestError(
            f"cannot create the folder of --out {path}: {error.strerror}", "choose a path you can write to"
        ) from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InvalidRequestError(f"cannot write --out {path}: permission denied", "choose a path you can write to")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.run in (_plan, _bench, _quality) and getattr(args, "out", None):
            _prepare_json_out(Path(args.out))
        args.run(args)
    except SecureInferError as exc:
        print(f"secureinfer: error: {exc.problem}; {exc.fix}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("secureinfer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug of ours: one line by default, the traceback on request
        if args.debug:
            traceback.print_exc()
        print(f"secureinfer: internal error: {type(exc).__name__}: {exc}; rerun with --debug and report it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
