"""``trellis2 serve --stdio``: the backend process the Blender add-on talks to over its pipes.

Process model (see docs/ARCHITECTURE.md and the add-on spec, part (b)):

* **Stream protection, first thing.** The protocol goes out on a private ``dup`` of fd 1; fd 1 is
  then pointed at fd 2 (the log), and fd 0 at ``/dev/null`` after taking a private dup of it. So
  ``print``, tqdm, C libraries and child processes writing to stdout, or reading stdin, can never
  corrupt or steal protocol bytes.
* **Threads.** A reader thread decodes frames: ``ping``/``cancel``/``shutdown`` are handled at
  once, jobs (``generate``/``texture``/``upscale``) and ``unload`` go to a FIFO queue. The main
  thread is the worker: one job at a time. A job request is validated (:mod:`backend.validation`)
  before it is queued, and its id is reserved together with a job-wide cancel ``threading.Event``
  the moment it arrives (a duplicate id is refused until the job has answered). Cancel is
  cooperative: the reader sets that event; opening the job (image intake, storing the inputs), every
  sampler step, :meth:`JobContext.progress`, the unwrap (a killable child process) and the chunked
  bake check it, and the job ends with a ``cancelled`` message (never with a late result).
* **Lifetime.** EOF on stdin means the add-on (Blender) is gone: the running job is cancelled and
  the process exits within ~1.5 s whatever the job is doing. ``--pdeathsig`` also asks Linux to
  SIGTERM us when the parent dies. Idle auto-unload (``--idle-unload MINUTES``) frees the models.
* **Errors** are typed: ``error{job, kind, message, advice, traceback_tail, log_tail}`` with kind in
  ``oom | missing_dependency | missing_weights | bad_input | cancelled | internal | protocol``.
* **Jobs** live in folders (:mod:`backend.jobs`) under ``--cache-dir``: inputs first, then the
  pipeline's resumable state, then the result, so nothing is lost on a crash.

Job execution goes through one small adapter, a *runner* (:class:`PipelineRunner` for the real
pipelines, :class:`backend.fake_runner.FakeRunner` for tests): ``describe()``, ``run(ctx)``,
``unload()``, ``loaded``.

The package, one job a module: :mod:`.context` (:class:`JobContext`, the :class:`Runner` protocol),
:mod:`.runner` (:class:`PipelineRunner`, :func:`make_runner`), :mod:`.classify` (error kinds),
:mod:`.logs` (log handlers; the log-tail reader is ``backend.errors.read_log_tail``), :mod:`.loop` (:class:`Server`), :mod:`.jobs_io`
(opening and running one job), :mod:`.process` (:func:`serve`, :func:`serve_tcp`, stdio protection)
and :mod:`.cli` (:func:`register`, :func:`make_token`).
"""

from __future__ import annotations

from .classify import classify_error
from .cli import make_token, register
from .context import JobContext, Runner
from ..errors import read_log_tail
from .loop import Server
from .process import protect_stdio, serve, serve_tcp, set_parent_death_signal
from .runner import PipelineRunner, background_policy, make_runner

__all__ = [
    "JobContext", "PipelineRunner", "Runner", "Server", "background_policy", "classify_error", "make_runner",
    "make_token", "protect_stdio", "read_log_tail", "register", "serve", "serve_tcp", "set_parent_death_signal",
]
