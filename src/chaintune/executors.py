"""Where stage jobs run. Every executor has the same small interface, used by the scheduler (`chaintune.engine.run`):

    submit(fn, job) -> concurrent.futures.Future   (runs fn(job) somewhere; the engine passes
                                                   chaintune.stage.execute)
    has_capacity(n_running) -> bool     recover()     shutdown()     describe() -> str
    retries: int (re-runs of a failed job)          inline: bool (jobs run in this process)

- `local`, 1 worker: jobs run one after another in this process (progress bars, the model stays loaded).
- `local`, N workers: N spawned processes; with GPUs, worker i sees only GPU i mod #GPUs (GPUs i·R … i·R+R−1 when
  a job runs as R ranks, chaintune.distributed); on CPU the cores are split between workers. A killed worker breaks the pool: it is rebuilt and the lost jobs are retried.
- `ray`: one Ray task per job (GPU/CPU resources per job), on a local Ray instance or `address="auto"` /
  `"ray://head:10001"` for an existing cluster. All nodes must see `output_dir` (shared storage). A job of N > 1
  ranks (`gpus_per_job: N`) is one Ray task holding N GPUs of one node, in which torchrun starts the ranks.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from chaintune.config import ExecutorConfig
from chaintune.errors import ChaintuneError
from chaintune.plan import Job


def _call(fn: Callable[[Job], Any], job: Job) -> Any:
    """What a Ray task runs (one remote function for any job function)."""
    return fn(job)


class InlineExecutor:
    inline = True

    def __init__(self, retries: int):
        self.retries = retries

    def submit(self, fn: Callable[[Job], Any], job: Job) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(job))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 — delivered to the scheduler like a worker's failure
            future.set_exception(exc)
        return future

    def has_capacity(self, n_running: int) -> bool:
        return n_running == 0

    def recover(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def describe(self) -> str:
        return "this process"


def _init_worker(devices, threads: int) -> None:
    """Pin a spawned worker to its GPUs (if any) and its share of the CPU cores, before torch is imported."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


class ProcessExecutor:
    inline = False

    def __init__(self, workers: int, retries: int, ranks: int = 1):
        import torch

        self.workers, self.retries, self.ranks = workers, retries, ranks
        self.gpus = torch.cuda.device_count()
        self.threads = max(1, (os.cpu_count() or 1) // (workers * ranks))
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        devices = None
        if self.gpus:
            devices = ctx.Queue()
            for i in range(self.workers):
                devices.put(",".join(str((i * self.ranks + r) % self.gpus) for r in range(self.ranks)))
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(devices, self.threads))

    def submit(self, fn: Callable[[Job], Any], job: Job) -> Future:
        return self.pool.submit(fn, job)  # fn and job are pickled to the spawned worker

    def has_capacity(self, n_running: int) -> bool:
        return n_running < self.workers

    def recover(self) -> None:
        """Rebuild the pool if a worker died (every job it held has failed and will be retried)."""
        try:
            self.pool.submit(int).result()
        except BrokenProcessPool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> str:
        per = (("one GPU" if self.ranks == 1 else f"{self.ranks} GPUs") if self.gpus
               else f"{self.threads} CPU thread(s)") + " each" + (f", {self.ranks} ranks per job" if self.ranks > 1 else "")
        return f"{self.workers} local worker processes ({per})"


class RayExecutor:
    inline = False

    def __init__(self, cfg: ExecutorConfig, ranks: int = 1):
        try:
            import ray
        except ImportError:
            raise ChaintuneError("the ray executor needs Ray", "pip install 'chaintune[ray]' (ray>=2.9)") from None
        self.ray, self.retries = ray, cfg.retries
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=cfg.address, ignore_reinit_error=True, log_to_driver=True)
        resources = ray.cluster_resources()
        gpus = cfg.gpus_per_job if cfg.gpus_per_job is not None else (float(ranks) if resources.get("GPU", 0) else 0.0)
        self.slots = max(1, int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1) // cfg.cpus_per_job))
        self.remote = ray.remote(num_cpus=cfg.cpus_per_job, num_gpus=gpus, max_retries=0)(_call)
        self.where = f"Ray ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; {gpus:g} GPU per job)"

    def submit(self, fn: Callable[[Job], Any], job: Job) -> Future:
        return self.remote.remote(fn, job).future()

    def has_capacity(self, n_running: int) -> bool:
        return n_running < self.slots

    def recover(self) -> None:
        pass  # Ray replaces dead workers itself

    def shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()

    def describe(self) -> str:
        return self.where


def make_executor(cfg: ExecutorConfig, ranks: int = 1):
    """The executor of `cfg`; `ranks`: processes per job (each job then launches torchrun, chaintune.distributed)."""
    if cfg.kind == "ray":
        return RayExecutor(cfg, ranks)
    if cfg.workers == 1:
        return InlineExecutor(cfg.retries)
    return ProcessExecutor(cfg.workers, cfg.retries, ranks)
