"""Running zoo jobs in a worker subprocess, so a hang, an OOM kill or a segfault costs one model.

The worker (``python -m ghostify.testing.runner``) reads jobs as JSON lines on stdin and answers
each with one marked JSON line on stdout; whatever the models print goes to a log instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import select
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from .zoo_checks import finish, run_job
from .zoo_jobs import Job

RESULT_MARK = "@@ZOO@@"
DEFAULT_TIMEOUT = 300.0
DEFAULT_MAX_PARAMS = 350_000_000  # original + working copy + grads must fit a shared CPU box
# The directory holding the ghostify package: the worker must import this very copy of it.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


class Runner:
    """Runs jobs in a worker subprocess; one job that hangs or crashes costs only itself.

    The worker is restarted after a timeout or a crash, and every ``recycle`` jobs (memory
    fragmentation, state leaked by a model). Its stderr goes to ``log`` (discarded if None).
    """

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        max_params: int | None = DEFAULT_MAX_PARAMS,
        threads: int = 1,
        recycle: int = 20,
        log: Path | None = None,
    ) -> None:
        self.timeout, self.max_params = timeout, max_params
        self.threads, self.recycle = threads, recycle
        self.log_path = log
        self.proc: subprocess.Popen | None = None
        self.done = 0

    def _start(self) -> subprocess.Popen:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "a")  # noqa: SIM115 - owned by the child for its lifetime
        else:
            log = subprocess.DEVNULL
        cmd = [sys.executable, "-m", "ghostify.testing.runner"]
        cmd += ["--threads", str(self.threads), "--max-params", str(self.max_params or 0)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.done = 0
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                text=True, bufsize=1, env=env)  # fmt: skip

    def run(self, job: Job) -> dict:
        """The job's result (see ``run_job``), or a "timeout" / "crash" result."""
        if self.proc is None or self.proc.poll() is not None or self.done >= self.recycle:
            self.close()
            self.proc = self._start()
        assert self.proc.stdin and self.proc.stdout
        start = time.perf_counter()
        self.proc.stdin.write(json.dumps(dataclasses.asdict(job)) + "\n")
        self.proc.stdin.flush()
        deadline = start + self.timeout
        while True:
            left = deadline - time.perf_counter()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            if not ready:
                self.close()
                return self._failed(job, start, "timeout", f"no result after {self.timeout:.0f}s")
            line = self.proc.stdout.readline()
            if not line:  # EOF: the worker died (OOM kill, segfault, abort)
                code = self.proc.wait()
                self.proc = None
                return self._failed(job, start, "crash", f"worker died with exit code {code}")
            if line.startswith(RESULT_MARK):
                self.done += 1
                return json.loads(line[len(RESULT_MARK) :])

    def _failed(self, job: Job, start: float, status: str, error: str) -> dict:
        res = {"zoo": job.zoo, "model": job.model, "family": job.family}
        return finish(res, start, status, error)

    def close(self) -> None:
        """Stop the worker, if one is running."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def worker_main(threads: int, max_params: int | None) -> None:
    """Read jobs (JSON lines) on stdin, answer RESULT_MARK lines on the original stdout."""
    result_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever models print goes to the log, not into the result stream
    sys.stdout = sys.stderr
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    for line in sys.stdin:
        job = Job(**json.loads(line))
        print(f"--- {job.key}", file=sys.stderr, flush=True)
        res = run_job(job, max_params)
        result_out.write(RESULT_MARK + json.dumps(res, default=str) + "\n")
        gc.collect()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="zoo sweep worker (started by Runner)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-params", type=int, default=0)
    options = parser.parse_args()
    worker_main(options.threads, options.max_params or None)
