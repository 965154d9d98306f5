"""The Dask cluster of a run, from the client's side: ``--dask`` parsed, a LocalCluster started or a
scheduler reached, and the start overlapped with the client's planning (``ClusterStarter``).

Dask is imported only when a cluster is opened: importing this module costs nothing at CLI start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from ..errors import RunError, UsageError
from . import worker

__all__ = ["ClusterStarter", "dashboard_link", "max_local_workers", "open_dask_client", "parse_scheduler",
           "worker_threads"]


def max_local_workers() -> int:
    """The most worker processes ``--dask local:N`` starts: ``max(64, 4 x cores)``.

    A bound against typos (``local:999``, ``local:10000``), not a tuning knob: every worker is a process
    holding its own copy of the model, so hundreds of them exhaust memory and process slots long before they
    add speed. Four per core still covers blocks that wait on slow storage, and the floor of 64 lets one
    command line move between a laptop and a workstation.
    """
    return max(64, 4 * (os.cpu_count() or 1))


def parse_scheduler(scheduler: str) -> int | str:
    """``local`` / ``local:N`` -> the worker count N; an address -> ``tcp://host:port``.

    A ``UsageError`` (exit 2) for anything else, before a model is loaded or any output is written: a worker
    count outside ``1..max_local_workers()``, garbage after ``local:``, an address without a port. Each
    LocalCluster worker runs one thread (one model session, whose backend has its own thread pool), so
    there is no threads field to give.
    """
    spec = scheduler.strip()
    if spec == "local":
        return min(os.cpu_count() or 1, max_local_workers())
    if spec.startswith("local:"):
        top = max_local_workers()
        text = spec.split(":", 1)[1].strip()
        n = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else 0
        if not 1 <= n <= top:
            raise UsageError(f"--dask {scheduler}: give a worker count from 1 to {top}, e.g. local:4",
                             hint=f"each worker is a process with its own copy of the model; {top} is "
                                  f"max(64, 4 x {os.cpu_count() or 1} cores)")
        return n
    if "://" not in spec and ":" not in spec:
        raise UsageError(f"--dask {scheduler}: expected local:N or a scheduler address like tcp://host:8786")
    return spec if "://" in spec else f"tcp://{spec}"


@contextlib.contextmanager
def open_dask_client(scheduler: str, *, timeout: float | None = None) -> Iterator[Any]:
    """``local`` / ``local:N`` (a LocalCluster of N single-threaded worker processes) or a scheduler address.

    ``local:1`` is one worker *thread* in this process (``processes=False``), not a worker process: one
    worker gains nothing from a process of its own (ONNX Runtime, torch and TensorFlow release the GIL while
    predicting and use every core from one session, as Dask recommends threads for such work), but a process
    costs its start, importing the backend there and a second model load (about 1.6 s of a 7-10 s run on
    8192²). ``run_dask`` lends that worker the client's own session (``worker.lend_session``). ``local:N``
    with N > 1 keeps processes: one session each, no GIL shared between their Python parts.

    ``timeout``: seconds to start the LocalCluster (default 60) or to reach the scheduler (default Dask's
    ``distributed.comm.timeouts.connect``, 30 s; ``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s`` shortens
    it): an address nobody listens on is retried until then.
    """
    target = parse_scheduler(scheduler)
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise UsageError("--dask needs Dask's distributed scheduler",
                         hint="pip install 'czregistry[dask]'") from exc
    if isinstance(target, int):
        local_timeout = 60.0 if timeout is None else timeout
        import importlib.util

        # the dashboard needs bokeh; without it the scheduler would only log a warning
        dashboard = "127.0.0.1:0" if importlib.util.find_spec("bokeh") is not None else None
        # a block that raises is retried once (submit(retries=1)); a task whose worker dies twice fails
        settings: dict[str, Any] = {"distributed.scheduler.allowed-failures": 1,
                                    "distributed.comm.timeouts.connect": f"{int(local_timeout)}s"}
        if target == 1:
            # Dask's statistical profiler samples every thread's stack each 10 ms under the GIL; in our own
            # process that includes the predictor's reader and writer threads, and cost the in-process
            # worker about 5% of an 8192² run (docs/runner.md). Process workers keep it (their own GIL).
            settings["distributed.worker.profile.enabled"] = False
        with dask.config.set(settings):
            # tcp on the loopback for local:1 too: in-process ("inproc") addresses would put the scheduler's
            # HTTP server (health, metrics) on the machine's network address
            cluster = LocalCluster(n_workers=target, threads_per_worker=1, processes=target > 1,
                                   protocol="tcp://", host="127.0.0.1", dashboard_address=dashboard,
                                   silence_logs=logging.CRITICAL)
            try:
                client = Client(cluster, timeout=local_timeout)
            except BaseException:
                cluster.close(timeout=30)
                raise
        try:
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.close(timeout=30)
            with contextlib.suppress(Exception):
                cluster.close(timeout=30)
        return
    if timeout is None:
        from dask.utils import parse_timedelta

        timeout = float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s") or 30)
    try:
        client = Client(target, timeout=timeout)
    except (OSError, TimeoutError) as exc:
        raise RunError(f"cannot reach the Dask scheduler at {target}: {exc}",
                       hint="is the scheduler running, and is its port open from here?") from exc
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=30)


def worker_threads(client: Any) -> int | None:
    """Worker threads of a running cluster (None when it has none yet or cannot say): the default block
    edge depends on it."""
    try:
        workers = client.scheduler_info().get("workers", {})
        return sum(int(w.get("nthreads", 1)) for w in workers.values()) or None
    except Exception:  # only informs the block edge
        return None


def dashboard_link(client: Any) -> str | None:
    """The dashboard's address, where the scheduler serves one (None otherwise)."""
    try:
        services = client.scheduler_info().get("services", {})
        return str(client.dashboard_link) if "dashboard" in services else None
    except Exception:  # purely informative
        return None


class ClusterStarter:
    """Starts the cluster (``open_dask_client``) on a thread while the client probes and plans (after its
    audit of the graph has passed), and has every worker load the model as soon as it is up: starting a
    LocalCluster (worker processes importing the backends) and loading the model in each took 3-4 s that
    the single-process run does not pay, and both can overlap with the planning. ``get`` returns the
    client (or raises what starting raised);
    ``close`` closes what was started, whenever it finishes starting."""

    def __init__(self, scheduler: str, warm: tuple[str, str, str | None, str] | None) -> None:
        """``warm``: what ``worker.warm`` loads on every worker; None for ``local:1``, which borrows the
        client's session (``worker.lend_session``) and loads nothing."""
        self._cm = open_dask_client(scheduler)
        self._warm = warm
        self.client: Any = None
        self.error: BaseException | None = None
        self._futures: list[Any] = []
        self._thread = threading.Thread(target=self._start, name="czreg-dask-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            self.client = self._cm.__enter__()
            warm = self._warm
            for address in self.client.scheduler_info().get("workers", {}) if warm is not None else ():
                self._futures.append(self.client.submit(worker.warm, *(warm or ()), workers=[address],
                                                        pure=False, key=f"czreg-warm-{uuid.uuid4().hex[:8]}"))
        except BaseException as exc:  # raised by ``get`` on the caller's thread
            self.error = exc

    def get(self) -> Any:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.client

    def close(self) -> None:
        self._thread.join()
        self._futures.clear()
        if self.client is not None:
            self.client = None
            self._cm.__exit__(None, None, None)
