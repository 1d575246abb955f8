"""The Ray engine of batch jobs: `JobWorker`s as Ray actors, one per GPU (or CPU workers).

Ray is the optional extra `modelmap[cluster]`. Ray schedules the actors (one GPU each where the
cluster has GPUs); this module only decides which entries go to which idle worker: chunks of one
compile key go, where it can, to a worker that has already compiled that key, so each worker
compiles few shapes. A worker that dies fails its chunk (recorded, resumed by the next run) and
the job goes on with the others.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

from ._jobs import EntryResult, JobWorker, describe_error
from ._manifest import JobEntry

__all__ = ["RayPool", "import_ray"]

INSTALL = "pip install 'modelmap[cluster]' (or pip install 'ray[default]')"


def import_ray():
    """The `ray` module, or an `ImportError` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"--engine ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


class _Worker(JobWorker):
    """The actor: a `JobWorker` living in its own process for the whole job."""

    def ready(self) -> str:
        import jax

        return jax.default_backend()


class RayPool:
    """Ray actors running `JobWorker.run`, used as a context manager.

    **Arguments:**

    - `address`: a running cluster's address (`ray://...` or `host:port`); `None` starts Ray on
      this machine (`ray.init()`), or joins the cluster of `$RAY_ADDRESS`.
    - `workers`: how many actors (default: one per GPU of the cluster; without GPUs, one per two
      CPUs, at least one: XLA's CPU backend runs several threads per process).

    A Ray started here is shut down on exit; one already initialized (or a cluster) is left running.
    """

    def __init__(self, address: str | None = None, workers: int | None = None):
        self.address, self.requested = address, workers
        self.actors: list = []
        self.size = 0
        self._started = False

    def __enter__(self) -> "RayPool":
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            with warnings.catch_warnings():
                # Ray forks and at once execs its own processes (raylet, GCS): not JAX's fork hazard
                warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
                ray.init(address=self.address, logging_level="ERROR", include_dashboard=False,
                         log_to_driver=False)
            self._started = True
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = int(resources.get("CPU", 1))
        if self.requested is not None and self.requested < 1:
            raise ValueError(f"--workers must be at least 1, got {self.requested}")
        self.size = self.requested or (gpus if gpus else max(1, cpus // 2))
        options = {"num_gpus": 1, "num_cpus": 0} if gpus else {"num_cpus": 1}
        actor = ray.remote(**options)(_Worker)
        self.actors = [actor.remote() for _ in range(self.size)]
        ray.get([a.ready.remote() for a in self.actors])  # start-up errors surface here, not mid-job
        return self

    def __exit__(self, *exc) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        if self._started:
            self.ray.shutdown()

    def map(self, chunks: Sequence[Sequence[JobEntry]]) -> Iterator[tuple[Sequence[JobEntry], list[EntryResult]]]:
        """`(chunk, results)` as workers finish chunks (in completion order).

        An idle worker takes the next chunk of a compile key it has compiled, else of a key no
        worker has taken yet, else any."""
        ray = self.ray
        pending = list(chunks)
        seen: dict[int, set] = {i: set() for i in range(len(self.actors))}
        alive = dict(enumerate(self.actors))
        running: dict = {}  # object ref -> (worker index, chunk)

        def take(i: int):
            keys = {c[0].compile_key() for c in pending}
            taken = set().union(*seen.values())
            for prefer in (seen[i] & keys, keys - taken, keys):
                for k, chunk in enumerate(pending):
                    if chunk[0].compile_key() in prefer:
                        return pending.pop(k)

        while pending or running:
            busy = {w for w, _ in running.values()}
            for i in list(alive):
                if i not in busy and pending:
                    chunk = take(i)
                    seen[i].add(chunk[0].compile_key())
                    running[alive[i].run.remote(list(chunk))] = (i, chunk)
            if not running:  # every worker died
                for chunk in pending:
                    yield chunk, [EntryResult(e.name, "failed", error="no Ray worker left to run it") for e in chunk]
                return
            [ref], _ = ray.wait(list(running), num_returns=1)
            i, chunk = running.pop(ref)
            try:
                results = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                alive.pop(i, None)
                results = [EntryResult(e.name, "failed", error=f"the Ray worker died: {describe_error(err)}")
                           for e in chunk]
            except Exception as err:
                results = [EntryResult(e.name, "failed", error=describe_error(err)) for e in chunk]
            yield chunk, results
