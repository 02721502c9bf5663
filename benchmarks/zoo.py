"""Coverage sweep: convert every torchvision model, the timm zoo, Hugging Face ``transformers``
vision models and ultralytics YOLO models; check each, write a table.

For every model: build it untrained (no weights are downloaded), run it on a small input, convert a
copy with default settings and another with ``example_inputs``, and check that

* the converted model's output has the original's structure and shapes, and no NaN/Inf,
* a backward pass (train mode where possible) reaches every GhostModule's parameters, with
  finite gradients,
* the MACs went down (``ghostify.report``) unless nothing was converted,
* every Conv1d/2d/3d of the original was either converted or skipped with a reason.

The cases and checks live in ``ghostify.testing`` (shared with tests/test_zoo.py). Each model runs
in a worker subprocess with a timeout, so a hang, an OOM kill or a segfault costs one model, not
the sweep; results are appended to a JSON-lines file, so a sweep can be resumed and split into
shards. Usage::

    python benchmarks/zoo.py                          # every zoo installed, then docs/coverage.md
    python benchmarks/zoo.py --zoo torchvision        # one zoo
    python benchmarks/zoo.py --zoo transformers       # needs pip install "ghostify[zoo]"
    python benchmarks/zoo.py --zoo timm --set reps    # one timm model per architecture family
    python benchmarks/zoo.py --families resnet,dla    # these timm families, every model
    python benchmarks/zoo.py --only resnet18,timm:dla34 --limit 5 --resume
    python benchmarks/zoo.py --report-only            # regenerate docs/coverage.md from results
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import sys
import time
from pathlib import Path

from ghostify.testing.coverage import load_results, render_markdown
from ghostify.testing.runner import DEFAULT_MAX_PARAMS, DEFAULT_TIMEOUT, Runner
from ghostify.testing.zoo_checks import PASSING
from ghostify.testing.zoo_jobs import (
    Job,
    job_for,
    timm_jobs,
    torchvision_jobs,
    transformers_jobs,
    ultralytics_jobs,
)

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "benchmarks" / "out"
RESULTS = OUT_DIR / "zoo-results.jsonl"
COVERAGE_MD = ROOT / "docs" / "coverage.md"


def select_jobs(args: argparse.Namespace) -> list[Job]:
    """The jobs the command line asks for, in sweep order."""
    if args.only:  # named models: no need to list (and size) the whole zoo
        names = [name for name in args.only.split(",") if name]
        if args.zoo != "all":  # a bare name means that zoo's model
            names = [name if ":" in name else f"{args.zoo}:{name}" for name in names]
        jobs = [j for j in map(job_for, names) if args.zoo in ("all", j.zoo)]
        return jobs[: args.limit] if args.limit else jobs
    families = [f for f in (args.families or "").split(",") if f]
    jobs: list[Job] = []
    if args.zoo in ("all", "torchvision") and not families:
        jobs += torchvision_jobs()
    if args.zoo in ("all", "timm"):
        which = "conv" if families and args.set == "all" else args.set
        jobs += timm_jobs(which, families or None, cache_dir=OUT_DIR)
    for zoo, listed in (("transformers", transformers_jobs), ("ultralytics", ultralytics_jobs)):
        if args.zoo == zoo or (args.zoo == "all" and not families and installed(zoo)):
            jobs += listed()
    return jobs[: args.limit] if args.limit else jobs


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (the optional zoos are skipped when it cannot)."""
    if importlib.util.find_spec(package) is None:
        print(f"{package} is not installed: its zoo is skipped", flush=True)
        return False
    return True


def sweep(jobs: list[Job], args: argparse.Namespace) -> None:
    """Run ``jobs`` one by one in a worker, appending each result to the results file."""
    done = load_results(args.results) if args.resume else {}
    if args.retry_failed:
        done = {k: r for k, r in done.items() if r["status"] in PASSING}
    todo = [j for j in jobs if j.key not in done]
    print(f"{len(todo)} models to run ({len(jobs) - len(todo)} already done)", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    log = OUT_DIR / "zoo-worker.log"
    start = time.perf_counter()
    counts: collections.Counter[str] = collections.Counter()
    with (
        Runner(args.timeout, args.max_params or None, args.threads, log=log) as runner,
        open(args.results, "a") as out,
    ):
        for index, job in enumerate(todo, 1):
            res = runner.run(job)
            out.write(json.dumps(res, default=str) + "\n")
            out.flush()
            counts[res["status"]] += 1
            elapsed = time.perf_counter() - start
            eta = elapsed / index * (len(todo) - index)
            error = f"  {res['error'][:120]}" if res.get("error") else ""
            print(f"[{index}/{len(todo)} {elapsed / 60:.1f}m eta {eta / 60:.0f}m] "
                  f"{job.key:55s} {res['status']:17s} {res['seconds']:6.1f}s{error}",
                  flush=True)  # fmt: skip
    print("done:", dict(counts), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    zoos = ("all", "torchvision", "timm", "transformers", "ultralytics")
    parser.add_argument("--zoo", choices=zoos, default="all")
    parser.add_argument(
        "--set",
        choices=("all", "reps", "conv"),
        default="all",
        help="timm: reps = one model per family, conv = conv-heavy families",
    )
    parser.add_argument("--families", help="comma-separated timm families (modules), all models")
    parser.add_argument(
        "--only", help="comma-separated models (zoo:name, or a name: torchvision first, then timm)"
    )
    parser.add_argument("--limit", type=int, help="at most this many models")
    parser.add_argument("--resume", action="store_true", help="skip models already in results")
    parser.add_argument("--retry-failed", action="store_true", help="with --resume: redo fails")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="s per model")
    parser.add_argument("--max-params", type=int, default=DEFAULT_MAX_PARAMS, help="0: no cap")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, default=COVERAGE_MD)
    parser.add_argument("--report-only", action="store_true", help="only regenerate the markdown")
    args = parser.parse_args(argv)
    if not args.report_only:
        sweep(select_jobs(args), args)
    results = load_results(args.results)
    args.markdown.write_text(render_markdown(results, "python benchmarks/zoo.py"))
    print(f"wrote {args.markdown} ({len(results)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
