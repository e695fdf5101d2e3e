"""`leanserve loadtest`: arguments (standard library only) and the entry point.

`add_arguments` runs whenever `leanserve --help` is built, so this module
imports nothing beyond argparse at import time; `main` imports the driver,
grpc, hdrh and matplotlib only when a load test actually runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _ints_or_keyword(text: str) -> list[int] | None | str:
    """`"2,4,8"` -> [2, 4, 8]; `"all"`/`"auto"` -> None (from the model); `"none"` -> []."""
    if text in ("all", "auto"):
        return None
    if text == "none":
        return []
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated integers, 'all' or 'none'") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use comma-separated numbers") from None


def _names_or_keyword(text: str) -> list[str] | None:
    if text == "all":
        return None
    return [] if text == "none" else [x for x in text.split(",") if x]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `leanserve loadtest` flags."""
    p.add_argument("--target", default="127.0.0.1:9000", help="gRPC HOST:PORT (default 127.0.0.1:9000)")
    p.add_argument(
        "--http",
        metavar="URL",
        help="drive the OpenAI route at URL, e.g. http://127.0.0.1:8000 (default: gRPC --target)",
    )
    p.add_argument(
        "--mode",
        choices=("open", "closed"),
        default="open",
        help="open: Poisson arrivals at --rate; closed: --concurrency in flight",
    )
    p.add_argument("--rate", type=float, default=2.0, help="open-loop arrivals per second (default 2)")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop in-flight requests (default 4)")
    p.add_argument(
        "--steps",
        type=_ints_or_keyword,
        default=None,
        help="step counts to sweep: '2,4,8', 'auto' (5 across the range, default) or 'none'",
    )
    p.add_argument(
        "--experts",
        type=_ints_or_keyword,
        default=[],
        help="expert settings at max steps: '1,2', 'all' or 'none' (default)",
    )
    p.add_argument(
        "--draft-steps",
        type=_ints_or_keyword,
        default=[],
        help="self-speculative draft step counts at max steps, after a draft_steps=0 point: '2,3,4', "
        "'all' (every count below max) or 'none' (default)",
    )
    p.add_argument(
        "--draft-tokens",
        type=int,
        default=None,
        help="tokens drafted per round at those points (default: server's)",
    )
    p.add_argument(
        "--tiers",
        type=_names_or_keyword,
        default=[],
        help="quality tiers: 'fast,best', 'all' or 'none' (default)",
    )
    p.add_argument("--rates", type=_floats, default=[], help="request rates to sweep at max steps: '1,2,4'")
    p.add_argument(
        "--overload",
        action="store_true",
        help="run the overload scenario: fixed N_max, N_max/2, the server's SLO controller",
    )
    p.add_argument(
        "--overload-rate", type=float, help="its rate (default 1.5 x the capacity measured at N_max)"
    )
    p.add_argument(
        "--step-load",
        action="store_true",
        help="run the step-load scenario: 0.5x -> 2x -> 0.5x --step-load-rate, every fixed step count "
        "and the server's SLO controller",
    )
    p.add_argument(
        "--step-load-rate", type=float, help="its unit rate, what N_max sustains (default: measured capacity)"
    )
    p.add_argument(
        "--phase-duration", type=float, default=20.0, help="seconds per step-load phase (default 20)"
    )
    p.add_argument(
        "--step-load-steps",
        type=_ints_or_keyword,
        default=None,
        help="fixed step counts the step load compares: '4,6,12' or 'all' (default)",
    )
    p.add_argument(
        "--stats-url",
        help="the server's /stats, e.g. http://127.0.0.1:8000/stats, polled (default: not polled)",
    )
    from loadtest.budget import add_arguments as add_budget_arguments  # standard library only

    add_budget_arguments(p)
    p.add_argument("--requests", type=int, default=50, help="most requests per point (default 50)")
    p.add_argument("--duration", type=float, default=30.0, help="send window per point, seconds (default 30)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument(
        "--prompt-lengths",
        default="fixed:16",
        help="words per prompt: fixed:N, uniform:LO:HI or lognormal:MED:LO:HI[:SIGMA]",
    )
    p.add_argument(
        "--prompts",
        choices=("synthetic", "bible"),
        default="synthetic",
        help="prompt text: a fixed word list or the World English Bible",
    )
    p.add_argument("--seed", type=int, default=0, help="arrival and prompt seed (default 0)")
    p.add_argument("--slo", default="ttft=0.5,itl=0.05", help="goodput SLO in seconds: ttft=S,itl=S[,e2e=S]")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds (default 60)")
    p.add_argument(
        "--no-retry",
        action="store_true",
        help="send every gRPC request once (default: retry UNAVAILABLE before the first message)",
    )
    p.add_argument(
        "--model-dir",
        help="model directory whose profile.json (perplexity, cost model) and config.json fill the ppl and "
        "predicted E2E columns (default: none, those columns stay blank)",
    )
    p.add_argument("--profile", help="profile.json to use instead of --model-dir's (default: --model-dir's)")
    p.add_argument("--out", default="runs/loadtest", help="report folder (default runs/loadtest)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: Any) -> Any:
    """A `SweepConfig` from parsed arguments (raises ValueError naming a bad value)."""
    from loadtest.arrivals import LengthSpec
    from loadtest.sweep import SLO, SweepConfig

    return SweepConfig(
        target=args.target,
        http_url=args.http,
        mode=args.mode,
        rate=args.rate,
        concurrency=args.concurrency,
        steps=args.steps,
        experts=args.experts,
        draft_steps=args.draft_steps,
        draft_tokens=args.draft_tokens,
        tiers=args.tiers,
        rates=args.rates,
        overload=args.overload,
        overload_rate=args.overload_rate,
        step_load=args.step_load,
        step_load_rate=args.step_load_rate,
        phase_s=args.phase_duration,
        step_load_steps=args.step_load_steps,
        stats_url=args.stats_url,
        max_requests=args.requests,
        duration_s=args.duration,
        max_tokens=args.max_tokens,
        prompt_lengths=LengthSpec.parse(args.prompt_lengths),
        prompt_source=args.prompts,
        seed=args.seed,
        slo=SLO.parse(args.slo),
        timeout_s=args.timeout,
        retries=not args.no_retry,
        model_dir=args.model_dir,
        profile_path=args.profile,
        progress=not args.no_progress,
    )


def main(args: Any) -> int:
    """`leanserve loadtest`: run the sweep, write the reports, print the summary."""
    if getattr(args, "budget_sweep", False):
        from loadtest.budget import main as budget_main

        return budget_main(args)
    import grpc

    from loadtest.report import markdown, write_report
    from loadtest.sweep import run_sweep

    config = config_from_args(args)
    try:
        report = run_sweep(config)
    except grpc.RpcError as e:  # only GetModelInfo raises: request errors are counted, not raised
        print(f"leanserve loadtest: error: {config.target}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    paths = write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {len(paths)} files to {args.out}", file=sys.stderr)
    return 0 if any(p.ok for p in report.points) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="leanserve loadtest", description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
