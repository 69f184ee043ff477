"""Start a torch.distributed world of N local processes from a notebook, a script or a test.

Every multi-process example of the course goes through :func:`run`::

    from paralab.launch import run
    import torch, torch.distributed as dist

    def work(rank, world_size, scale):
        t = torch.tensor([float(rank)]) * scale
        dist.all_reduce(t)                     # the default process group is ready
        print("sum is", t.item())              # echoed in the parent as "[rank r] sum is ..."
        return t

    run(work, 4, 2.0)                          # -> [tensor([12.]), tensor([12.]), ...]

``run`` exists because the plain tools fail students in ways that teach nothing: ``spawn``
cannot pickle a function defined in a notebook and takes ~7 s per world on the course
machines; ``fork`` hangs in the first matmul once the parent has used an OpenMP pool; child
output goes to the Jupyter server's terminal instead of the cell; a rank that raises makes
the others fail with "Connection closed by peer", which hides the real error; a rank that
never reaches a collective hangs the notebook forever.  ``run`` instead

* serialises ``fn`` and its arguments by value with cloudpickle, so notebook functions,
  closures and lambdas work;
* forks workers from a ``forkserver`` that has torch (and what a rank's first backward
  and optimizer import) already imported (~3 s for the first 4-rank world of a Python
  process, ~0.2 s for the next ones, against 3-9 s for every world with ``spawn`` on the
  course machines: ``bench/bench_launch.py``), each worker with one intra-op thread
  (N ranks x default threads on 2 cores are 30-70x slower); :func:`warm_up` starts it
  ahead, for a program that has something else to do first;
* meets at a ``TCPStore`` that the parent opens on a port the OS chooses (no port races),
  and starts the world again when its ranks could not connect (a transient failure on a
  loaded machine), at most 3 times, before any rank has run fn: fn runs once per rank;
* returns every rank's return value *by value* (pickled through a private temporary
  directory), tensors included, in rank order;
* echoes each rank's stdout/stderr in the parent, prefixed ``[rank r]``;
* on failure raises :class:`WorkerError` naming the rank that failed *first* with its own
  traceback, and on a hang raises :class:`WorkerTimeout` saying where each rank is stuck;
  no worker, or process started by a worker, outlives the call.

The same worker function also runs under ``torchrun`` (``env://`` rendezvous), e.g. on GPUs.
From the command line, for a module ``mymod.py`` (on ``PYTHONPATH`` or in the current
directory) that defines ``work(rank, world_size, *args)``::

    # one machine, CPU, 4 local processes started by run():
    python -m paralab.launch mymod:work --world-size 4

    # the same under torchrun (one machine):
    torchrun --standalone --nproc-per-node 4 -m paralab.launch mymod:work

    # two machines with 8 GPUs each (run on both; HOST is the first machine):
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m paralab.launch mymod:work

Extra command-line arguments are passed after ``world_size``; each is converted with
``ast.literal_eval`` when it is a Python literal (``3``, ``0.5``, ``"[1, 2]"``) and passed as a
string otherwise.  Options: ``--world-size N`` (default 2; under torchrun the world is
torchrun's and a different N is refused), ``--backend {auto,gloo,nccl}``, ``--timeout S``.
In a script of your own, call :func:`from_env` under torchrun instead of :func:`run`.

Rules worth knowing
-------------------
* Arguments are copied to every rank (pickled by value); mutating them in a worker does not
  change the parent's objects.  Return what you need.  Everything passed or returned must be
  picklable by cloudpickle (tensors, modules, dicts of them, functions: yes; open files,
  locks, generators, CUDA streams: no).  CUDA tensors come back as CUDA tensors; return
  ``t.cpu()`` if the parent should not touch the GPU.
* Functions from importable modules are pickled by reference and re-imported in the
  workers (with the parent's ``sys.path`` and working directory); functions defined in a
  notebook or in ``__main__`` are pickled by value, with the globals they use.
* Workers see the parent's ``os.environ`` as it is when ``run`` is called, plus
  ``OMP_NUM_THREADS=1``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``.
* Every call starts fresh processes: nothing a rank sets up survives into the next call.
  The process group is destroyed when fn returns or raises.
* In a script, call ``run`` under ``if __name__ == "__main__":`` (as with multiprocessing:
  the worker processes import the main module).  Likewise a function from a test module is
  imported by every worker, with pytest; ``cloudpickle.register_pickle_by_value(module)``
  sends the module's functions by value instead, which makes each world ~0.1 s faster.
* ``timeout`` also bounds every collective (it is the process group's timeout), so raise it
  for long runs.  :class:`WorkerTimeout` is a subclass of :class:`WorkerError`, itself a
  ``RuntimeError``: ``except WorkerError`` catches both.
* Create every tensor on :func:`device` (the rank's GPU under NCCL, else the CPU), so that
  the same code runs under gloo and NCCL; :mod:`paralab.comm` refuses a tensor that is
  elsewhere.  ``PARALAB_DEVICE=cuda`` puts gloo ranks on the GPU too (several ranks may
  share one), which checks a tensor-parallel exercise's placement on a single GPU.

The package, by concept
-----------------------
``lifecycle``   :func:`run`: start the ranks, supervise them, collect, stop them;
``worker``      what each rank's process does, and the files it reports through;
``rendezvous``  joining the process group, and when a failed join may be repeated;
``diagnosis``   which rank to blame and where hung ranks are stuck;
``backend``     gloo or NCCL, and :func:`device`;
``torchrun``    :func:`from_env`, the adapter for processes started by torchrun;
``cli``         ``python -m paralab.launch``;
``errors``      :class:`WorkerError` and :class:`WorkerTimeout`.
"""

from .backend import device, resolve_backend
from .cli import main
from .errors import WorkerError, WorkerTimeout
from .lifecycle import run, warm_up
from .torchrun import from_env

__all__ = ["run", "warm_up", "from_env", "device", "WorkerError", "WorkerTimeout", "main"]

# The name paralab.pipeline has always called it by.
_resolve_backend = resolve_backend
