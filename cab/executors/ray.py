"""Ray executor: each cell is a Ray task that runs the cell isolated (`run_isolated`: a fresh process with
the time, memory and output limits) on whichever node Ray picks; results flow back to the driver, which
alone writes the store.

A cell on a CUDA device asks Ray for one GPU (Ray sets CUDA_VISIBLE_DEVICES for the task, and the cell
process gets it); other cells ask for as many CPUs as their `threads`, so Ray packs them by cores. Tasks
whose Ray worker dies (a node lost, a worker killed) are retried `max_retries` times; a cell's own crash
never kills its Ray worker, since it runs in a process of its own.

With no `address`, a private Ray instance starts on this machine, listening on the loopback interface
only, and stops when the executor closes. With `address` ("auto", or "HOST:PORT" of a head node started
with `ray start --head`) the executor joins that cluster and leaves it running. Ray is optional:
`pip install 'cab[ray]'`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterable, Iterator, Sequence

from cab.cells import Cell, Result
from cab.executors.base import CellCallback, Executor
from cab.executors.subprocess import DEFAULT_GRACE_S, DEFAULT_MAX_OUTPUT_BYTES, Limits, _now, run_isolated
from cab.status import Status

# Ray picks the loopback address for a single-machine instance only when "clusters" are off; read when
# ray is imported, and by the processes the instance starts
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # cells exchange small JSON results only


class RayUnavailable(RuntimeError):
    """Ray is not installed, or the cluster cannot be reached."""


def _import_ray(local: bool) -> Any:
    if local:
        os.environ.setdefault(_LOOPBACK_ENV, "0")
    try:
        import ray
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise RayUnavailable("the ray executor needs Ray: pip install 'cab[ray]'") from None
    if local and os.environ.get(_LOOPBACK_ENV) == "0":
        # ray was imported earlier (with clusters on): loopback-only for the instance started here too
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    return ray


def run_on_worker(cell: dict, plugins: "list[str]", limits: dict) -> dict:
    """Body of a cell's Ray task: run it isolated on this node, return its Result as a dict."""
    return run_isolated(Cell.from_dict(cell), plugins=plugins, limits=Limits(**limits)).to_dict()


@functools.lru_cache(maxsize=None)
def _remote(ray: Any, max_retries: int) -> Any:
    return ray.remote(max_retries=max_retries, retry_exceptions=False)(run_on_worker)


class RayExecutor(Executor):
    """Cells as Ray tasks, at most `max_in_flight` submitted at once (default: twice the cluster's CPUs)."""

    name = "ray"

    def __init__(self, *, timeout_s: "float | None" = None, plugins: Sequence[str] = (),
                 address: "str | None" = None, num_cpus: "int | None" = None,
                 memory_limit_bytes: "int | None" = None, grace_s: float = DEFAULT_GRACE_S,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES, max_retries: int = 2,
                 max_in_flight: "int | None" = None):
        super().__init__(timeout_s=timeout_s, plugins=plugins)
        self.address, self.num_cpus = address, num_cpus
        self.limits = Limits(timeout_s=timeout_s, grace_s=grace_s, memory_limit_bytes=memory_limit_bytes,
                             max_output_bytes=max_output_bytes)
        self.max_retries, self.max_in_flight = max_retries, max_in_flight
        self._ray: Any = None
        self._owned = False

    def _connect(self) -> Any:
        """Ray, initialised: joined to `address`, or a local loopback-only instance started here."""
        if self._ray is not None:
            return self._ray
        ray = _import_ray(local=self.address is None)
        if not ray.is_initialized():
            options: dict = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
            if self.address is None:
                options.update(num_cpus=self.num_cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            try:
                ray.init(address=self.address, **options)
            except ConnectionError as exc:
                raise RayUnavailable(f"cannot reach the Ray cluster at {self.address}: {exc}") from None
            self._owned = True
        self._ray = ray
        return ray

    def _largest_node_cpus(self, ray: Any) -> int:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        return max((int(n.get("Resources", {}).get("CPU", 1)) for n in nodes), default=1)

    def resources(self, cell: Cell, largest_node_cpus: int) -> dict:
        """Ray resources of a cell's task: one GPU for a CUDA cell, its thread count in CPUs (capped at
        the largest node, so that no task waits forever for a node that does not exist)."""
        threads = int(cell.options.get("threads") or 1)
        gpus = 1 if cell.device.startswith("cuda") else 0
        return {"num_cpus": max(1, min(threads, largest_node_cpus)), "num_gpus": gpus}

    def run(self, cells: Iterable[Cell], on_start: "CellCallback | None" = None) -> Iterator[Result]:
        ray = self._connect()
        remote = _remote(ray, self.max_retries)
        largest = self._largest_node_cpus(ray)
        limit = self.max_in_flight or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
        limits = dataclasses.asdict(self.limits)
        todo, pending = iter(cells), {}
        try:
            while True:
                while len(pending) < limit and (cell := next(todo, None)) is not None:
                    ref = remote.options(**self.resources(cell, largest)).remote(cell.to_dict(), self.plugins, limits)
                    pending[ref] = (cell, _now())
                    if on_start is not None:
                        on_start(cell)
                if not pending:
                    return
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                cell, submitted = pending.pop(ref)
                yield self._collect(ray, ref, cell, submitted)
        finally:  # interrupted or abandoned: stop what is still queued or running
            for ref in pending:
                ray.cancel(ref, force=True)

    def _collect(self, ray: Any, ref: Any, cell: Cell, submitted: str) -> Result:
        try:
            result = Result.from_dict(ray.get(ref))
        except ray.exceptions.RayError as exc:  # the task itself failed: its worker or node died for good
            return Result(cell=cell, status=Status.ERROR, started_at=submitted, finished_at=_now(),
                          message=f"Ray could not run the cell (after {self.max_retries} retries): "
                                  f"{type(exc).__name__}: {str(exc)[:3000]}")
        result.cell = cell
        return result

    def close(self) -> None:
        if self._owned and self._ray is not None:
            self._ray.shutdown()
        self._ray, self._owned = None, False


__all__ = ["RayExecutor", "RayUnavailable", "run_on_worker"]
