"""The `kvray` command: `methods`, `eval`, `serve`, `report`."""

from __future__ import annotations

import argparse
import logging
import sys


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ratios(text: str) -> list[float]:
    out = []
    for t in _csv(text):
        try:
            r = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"ratio {t!r} is not a number; ratios lie in [0, 1), e.g. 0.5,0.75")
        if not 0.0 <= r < 1.0:
            raise argparse.ArgumentTypeError(f"ratio {r} outside [0, 1): it is the fraction of KV entries removed")
        out.append(r)
    return out


def _lengths(text: str) -> list[int]:
    try:
        out = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be integers (tokens), e.g. 1000,4000; got {text!r}")
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive token counts, got {text!r}")
    return out


DEFAULT_METHODS = "full,random,streaming_llm,knorm,snapkv,pyramidkv,adakv"
DEFAULT_TASKS = "niah_single,niah_multikey,vt"
DEFAULT_SAMPLES = 5


def _json_object(text: str | None, flag: str, example: str) -> dict:
    import json

    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"kvray: {flag} is not valid JSON ({exc}); expected e.g. '{example}'")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise SystemExit(f"kvray: {flag} must map names to option objects, e.g. '{example}'")
    return data


def cmd_methods(args) -> int:
    from .presses import describe_methods, method_params

    width = max(len(n) for n, _ in describe_methods())
    for name, doc in describe_methods():
        line = doc if len(doc) <= 110 else doc[:107] + "..."
        print(f"{name:<{width}}  {line}")
        if args.verbose or args.methods_verbose:
            print(f"{'':<{width}}  params: {', '.join(method_params(name))}")
    return 0


def cmd_eval(args) -> int:
    from .eval import TASKS, load_samples, make_samples
    from .eval.runner import ModelHost, build_presses, run_eval, set_threads, summarize
    from .presses import list_methods

    methods = _csv(args.methods)
    bad = [m for m in methods if m not in list_methods()]
    if bad:
        raise SystemExit(f"kvray eval: unknown method(s) {bad}; known: {', '.join(list_methods())}")
    presses = build_presses(methods, args.ratios, _json_object(args.method_params, "--method-params",
                                                                 '{"snapkv": {"window_size": 64}}'))
    set_threads(args.threads)
    host = ModelHost.load(args.model, device=args.device)
    if args.dataset:
        samples = load_samples(args.dataset, limit=args.samples)  # None: the whole dataset
    else:
        tasks = _csv(args.tasks)
        bad = [t for t in tasks if t not in TASKS]
        if bad:
            raise SystemExit(f"kvray eval: unknown task(s) {bad}; known: {', '.join(TASKS)}")
        options = _json_object(args.task_options, "--task-options", '{"niah_single": {"value_kind": "word"}}')
        unknown = set(options) - set(tasks)
        if unknown:
            raise SystemExit(f"kvray eval: --task-options names tasks not evaluated: {sorted(unknown)}")
        count = lambda s: len(host.lm.tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
        samples = [s for n in args.length for t in tasks
                   for s in make_samples(t, args.samples or DEFAULT_SAMPLES, n, seed=args.seed, count_tokens=count,
                                         **options.get(t, {}))]
    protocols = [False, True] if args.both_protocols else [bool(args.query_aware)]
    print(f"kvray eval: {host.lm.name} on {host.lm.device}, {len(samples)} samples x {len(presses)} configs x "
          f"{len(protocols)} protocol(s), one prefill per sample", file=sys.stderr)
    run_id, df = run_eval(host, samples, presses, out_dir=args.out, protocols=protocols, run_id=args.run_id,
                          progress=not args.no_progress)
    print(summarize(df))
    print(f"\nrun {run_id}: {len(df)} rows in {args.out}/run_id={run_id}/")
    return 0


def cmd_serve(args) -> int:
    from .serve.app import serve_locally

    if not 1 <= args.port <= 65535:
        raise SystemExit(f"kvray serve: --port must be in 1..65535, got {args.port}")
    return serve_locally(args.policies, args.model, args.host, args.port, address=args.address, detach=args.detach,
                         max_replicas=args.max_replicas, cpus=args.cpus, num_gpus=args.gpus,
                         request_timeout_s=args.request_timeout)


def cmd_report(args) -> int:
    from .report import main as report_main

    return report_main([args.run_dir] + (["--out", args.out] if args.out else []))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvray", description="Evaluate, tune and serve KV-cache compression.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("methods", help="list the compression methods")
    m.add_argument("-v", "--verbose", action="store_true", dest="methods_verbose", help="each method's parameters")
    m.set_defaults(fn=cmd_methods)

    e = sub.add_parser("eval", help="evaluate methods x ratios on the task suite; rows to Parquet")
    e.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: embedded SmolLM2-135M)")
    e.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    e.add_argument("--ratios", type=_ratios, default=[0.5], help="compression ratios, fraction removed (default 0.5)")
    e.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated task names (default {DEFAULT_TASKS})")
    e.add_argument("--length", type=_lengths, default=[1000],
                   help="context length(s) in tokens, comma-separated (default 1000)")
    e.add_argument("--samples", type=int, default=None,
                   help=f"samples per task (default {DEFAULT_SAMPLES}); with --dataset, the first N rows (default: all)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--task-options", default=None,
                   help='JSON per task, e.g. \'{"niah_single": {"value_kind": "uuid"}}\'')
    e.add_argument("--dataset", default=None, help="a local .parquet/.jsonl (kvpress columns) or HF dataset instead")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--query-aware", action="store_true", help="compress with the question in the prompt")
    g.add_argument("--both-protocols", action="store_true", help="query-agnostic and query-aware, same prefill")
    e.add_argument("--method-params", default=None, help='JSON, e.g. \'{"snapkv": {"window_size": 64}}\'')
    e.add_argument("--out", default="results", help="output directory (default results/)")
    e.add_argument("--run-id", default=None, help="resume or name a run (default: a new timestamped id)")
    e.add_argument("--device", default=None)
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("serve", help="serve the policies over HTTP with Ray Serve (127.0.0.1:8000)",
                       description="Deploy the kvray HTTP API (docs/architecture.md, section 7) on Ray Serve: attaches to "
                                   "the running Ray cluster (e.g. the head `make calibrate` started) or starts a "
                                   "private one, and serves until Ctrl-C. Env: KVRAY_API_KEY (require x-api-key).")
    s.add_argument("--policies", default=None, help="policy directory (default env KVRAY_POLICIES, else runs/policies)")
    s.add_argument("--model", default=None, help="hub id, local dir or .gguf (default: embedded SmolLM2-135M)")
    s.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--cpus", type=float, default=None, help="CPUs (and torch threads) per model replica (default 1)")
    s.add_argument("--gpus", type=float, default=None, help="GPUs per model replica (default 0)")
    s.add_argument("--max-replicas", type=int, default=None, help="autoscaling ceiling for model replicas (default 1)")
    s.add_argument("--request-timeout", type=float, default=None, metavar="S",
                   help="seconds of model work per request before a 504 (default 300)")
    s.add_argument("--address", default="auto",
                   help="Ray cluster: auto (the running one, else a private Ray; default), local (always a "
                        "private Ray), or host:port")
    s.add_argument("--detach", action="store_true", help="deploy on the running cluster and return")
    s.set_defaults(fn=cmd_serve)

    r = sub.add_parser("report", help="write a self-contained HTML report (PNG plots) of a calibrate run")
    r.add_argument("run_dir", help="a run directory written by jobs/calibrate.py, e.g. runs/<run_id>")
    r.add_argument("--out", default=None, help="HTML path (default RUN_DIR/report.html)")
    r.set_defaults(fn=cmd_report)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kvray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
