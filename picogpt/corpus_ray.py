"""The corpus commands on a Ray cluster: `picogpt score-corpus ... --ray auto` (or --ray ADDRESS, or
--ray local for a cluster of this machine alone). Imported only with --ray; Ray is picogpt's `ray` extra
(`pip install -e '.[ray]'` in the checkout, or `pip install 'ray>=2.10'`: Ray's core, not Ray Data).

The plan's chunks (picogpt.corpus.plan: where each chunk's documents are, not the documents) are handed
out to a pool of actors (ChunkWorker), one chunk at a time to each, each actor with num_cpus=T so that
its BLAS gets T threads. The model's arrays go into Ray's object store once, from the driver: every node
then holds one copy, which its actors read in place (zero-copy), so only the driver needs the model file.
Each actor reads its chunks' documents from the input files, which must therefore be at the same path on
every node (on one machine they are; relative paths are the driver's, made absolute by the plan). The
driver writes the chunks' lines in plan order exactly as the in-process path does
(picogpt.corpus.CorpusOutput), so the output, and resuming it, are the same; an actor that dies is
restarted by Ray and its chunk run again. Each actor reports its batches to a small ProgressBoard actor,
so that the progress bar moves while the chunks run.

Joining a cluster is checked step by step, each step with a time limit and a one-line failure that
says which step failed: the address (nothing listening), the cluster's answer (Ray's token
authentication), and ray.init itself. A cluster that --ray local starts is stopped with its driver,
even one killed outright (a watchdog process removes what Ray leaves behind). Ray's own notes go to
stderr, at warning level (info with -v); nothing of Ray's goes to stdout.
"""

import atexit
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from types import SimpleNamespace

from . import blas
from .corpus import Chunk, CorpusJob, read_chunk
from .errors import PicogptError, first_line, plural, shown
from .hints import install_command
from .model import GPT2
from .modelfile import open_model_file
from .precision import weights_for_backend

REACH_SECONDS = 5  # for the address to accept a connection
PROBE_SECONDS = 20  # for the cluster to answer a first request (a listener that is not Ray never does)
JOIN_SECONDS = 90  # for ray.init to join the cluster or start the local one
WAITING_NOTE_SECONDS = 10  # with no actor started by then, the status says what they wait for


def require_ray():
    try:
        import ray
    except ImportError:
        raise PicogptError(f"--ray needs Ray, which is not installed: {install_command('ray')}") from None
    return ray


def memory_of_this_process():
    """(resident, proportional) set size in bytes: RSS counts every shared page in full, PSS divides each
    by the processes sharing it, so a weight held once per node shows as a fraction in each actor's PSS."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[-1] == "kB"}
        return fields.get("Rss", 0), fields.get("Pss", 0)
    except OSError:  # not Linux
        return 0, 0


# ---------------------------------------------------------------------------------------------------
# The actors

class ChunkWorker:
    """A Ray actor: makes the model once from the weights in the object store, then runs chunks.

    A problem with the job on this node (its memory, for one) is not raised from the constructor, which
    Ray would report as a traceback, but kept and returned by ready() and run(), one sentence."""

    def __init__(self, board, hparams, weight_dtype, job_options, threads, backend="numpy", bf16=None):
        import ray
        # board: the ProgressBoard's name; it holds the reference to the weights. (Ray warns, at error level,
        # of an actor that may be restarted whose arguments are, or hold, a reference or an actor handle.)
        self.board = ray.get_actor(board)
        self.error, self.host = None, socket.gethostname()
        try:
            (weights,) = ray.get(self.board.weights.remote())
            weights = ray.get(weights)  # read-only NumPy arrays over the object store's memory: no copy
            blas.use(backend, threads=threads)  # the driver's backend and bfloat16 choice: the driver's numbers
            tensors, precision = weights_for_backend(
                SimpleNamespace(tensors=weights, weight_dtype=weight_dtype, path=None), bf16)
            model = GPT2(hparams, tensors)
            model.precision = precision
            self.job = CorpusJob(model, **job_options)
        except PicogptError as e:
            self.error = f"on the Ray node {self.host}: {e}"

    def ready(self):
        return self.error

    def run(self, chunk_json):
        chunk = Chunk.from_json(chunk_json)
        if self.error:
            return dict(number=chunk.number, fatal=self.error)
        done = [0, 0]

        def on_batch(n_docs, n_tokens):
            done[0], done[1] = done[0] + n_docs, done[1] + n_tokens
            if self.board is not None:
                self.board.report.remote(chunk.number, done[0], done[1])
        try:
            text, n_tokens, n_errors = self.job.run(read_chunk(chunk), on_batch)
        except PicogptError as e:
            return dict(number=chunk.number, fatal=str(e))
        except OSError as e:
            return dict(number=chunk.number, fatal=f"cannot read {shown(e.filename or chunk.paths[0])} on the Ray node "
                        f"{self.host}: {e.strerror}; every node must see the inputs at the same path (shared storage)")
        rss, pss = memory_of_this_process()
        return dict(number=chunk.number, text=text, n_tokens=n_tokens, n_errors=n_errors, pid=os.getpid(), rss=rss,
                    pss=pss)


class ProgressBoard:
    """A Ray actor that holds how far each chunk under way has got, (documents, tokens) by chunk number, and
    the reference to the model's weights in the object store, for the actors (and those Ray restarts)."""

    def __init__(self, weights):
        self.chunks, self._weights = {}, weights  # [ref]: inside a list, Ray passes the reference itself

    def weights(self):
        return self._weights

    def report(self, number, n_docs, n_tokens):
        self.chunks[number] = (n_docs, n_tokens)

    def snapshot(self, forget=()):
        for number in forget:
            self.chunks.pop(number, None)
        return dict(self.chunks)


# ---------------------------------------------------------------------------------------------------
# Ray's own output: to stderr, at warning level unless -v, nothing on stdout

_note = None  # where Ray's notes go (a progress bar's write), or None for stderr


def _say(line):
    if _note is not None:
        _note(line)
    else:
        print(line, file=sys.stderr, flush=True)


def quiet_ray(verbose=False):
    """Ray's logging at warning level (info with verbose), its notes to stderr, nothing of it on stdout."""
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # a note about a cluster that --ray local makes for this run alone
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    initialise = sys.modules.get("colorama.initialise")  # Ray's bundled colorama writes ESC[0m to stdout at exit
    if initialise is not None:
        atexit.unregister(initialise.reset_all)
    worker = sys.modules.get("ray._private.worker")
    if worker is not None and getattr(worker, "print_to_stdstream", None) is not None \
            and worker.print_to_stdstream is not _ray_lines_to_stderr:
        worker.print_to_stdstream = _ray_lines_to_stderr  # the raylet's notes and (with -v) the actors' output


def _ray_lines_to_stderr(data, ignore_prefix=False):
    source = data.get("pid")
    for line in data.get("lines", []):
        if "__ray_tqdm_magic_token__" in line:  # Ray's own progress bars: picogpt has one
            continue
        _say(f"ray ({source}): {line}" if source else f"ray: {line}")


# ---------------------------------------------------------------------------------------------------
# Joining a cluster, or starting one on this machine

def connect(address, n_cpus, verbose=False):
    """Join the cluster at address ("auto": the one this machine belongs to), or start a local one ("local")
    of n_cpus CPUs. Each step has a time limit and fails in one sentence saying which step and what to do."""
    ray = require_ray()
    quiet_ray(verbose)
    if ray.is_initialized():  # a caller (a notebook, the tests) already has a cluster
        return ray
    options = dict(include_dashboard=False, log_to_driver=verbose,
                   logging_level=logging.INFO if verbose else logging.WARNING)
    if address == "local":
        watch_local_cluster()
        _start_here(ray, dict(num_cpus=n_cpus, **options))
    elif address.startswith("ray://"):  # Ray Client: its own protocol, ray.init's checks only
        _init_in_time(ray, f"joining the Ray cluster at {address}", "check the address",
                      dict(address=address, **options))
    else:
        gcs = find_cluster(address)
        reach(address, gcs)
        use_this_machines_token(gcs)
        probe(address, gcs)
        _init_in_time(ray, f"joining the Ray cluster at {address}", "run picogpt on one of the cluster's machines "
                      "(ray start --address ADDRESS there first)", dict(address=gcs, **options))
    quiet_ray(verbose)  # what ray.init imported
    return ray


def find_cluster(address):
    """The cluster's GCS address, HOST:PORT, for --ray ADDRESS or auto."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return address
    try:
        gcs = canonicalize_bootstrap_address(address)
    except ConnectionError:  # auto, and no cluster was started on this machine
        raise PicogptError("--ray auto found no Ray cluster on this machine; start one with ray start --head (or "
                           "join one with ray start --address HEAD:6379), or use --ray local for this machine "
                           "alone") from None
    except Exception as e:  # a malformed address, a host name that does not resolve
        raise PicogptError(f"--ray {address}: {first_line(e)}; give the address ray start --head printed "
                           f"(HOST:PORT), auto or local") from None
    if not gcs:
        raise PicogptError(f"--ray {address!r} is not an address; give HOST:PORT, auto or local")
    return gcs


def _host_port(gcs):
    host, _, port = gcs.rpartition(":")
    return host.strip("[]"), int(port)


def reach(address, gcs):
    """The address accepts a connection, or one line: nothing listens there, or nothing answers."""
    where = address if address == gcs else f"{address} ({gcs})"
    try:
        socket.create_connection(_host_port(gcs), timeout=REACH_SECONDS).close()
    except ConnectionRefusedError:
        if address == "auto":
            raise PicogptError(f"the Ray cluster this machine last joined ({gcs}) is gone; start one with ray start "
                               f"--head, or use --ray local for this machine alone") from None
        raise PicogptError(f"nothing listens at {where}, so no Ray cluster is there; start one with ray start --head "
                           f"on that machine (it prints the address to give), or use --ray local") from None
    except OSError as e:
        reason = f"no answer in {REACH_SECONDS} s" if isinstance(e, TimeoutError) else (e.strerror or first_line(e))
        raise PicogptError(f"cannot reach {where}: {reason}; check the address (ray start --head prints it) and the "
                           f"network, or use --ray local") from None


def on_this_machine(host):
    """Whether host is one of this machine's own addresses (one it can bind a socket to)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((sockaddr[0], 0))
                return True
        except OSError:
            continue
    return False


def use_this_machines_token(gcs):
    """Ray's token authentication (on for clusters started where ~/.ray/auth_token exists) for a cluster on
    this machine: its token, as --ray auto uses it. Ray sends no token to an address given explicitly, and
    neither does picogpt to another machine's: RAY_AUTH_MODE=token says to (docs/corpora.md)."""
    if os.environ.get("RAY_AUTH_MODE") is not None or not on_this_machine(_host_port(gcs)[0]):
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except (ImportError, AttributeError, TypeError):  # a Ray without token authentication
        pass


PROBE = """
import sys
try:
    from ray._raylet import GcsClient
    GcsClient(address=sys.argv[1])
except Exception as e:
    print(type(e).__name__, str(e).strip().splitlines()[0] if str(e).strip() else "")
    sys.exit(1)
"""


def probe(address, gcs):
    """Ask the cluster for its id once, in a separate process with a time limit: one line if it is not a Ray
    cluster, or if it refuses this process's token (Ray's own client retries for minutes, deaf to SIGTERM)."""
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, gcs], capture_output=True, text=True,
                              timeout=PROBE_SECONDS, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PicogptError(f"{address} accepts connections but does not answer as a Ray cluster (nothing in "
                           f"{PROBE_SECONDS} s); check the port: ray start --head prints the address (Ray's default "
                           f"port is 6379)") from None
    if done.returncode == 0:
        return
    said = done.stdout.strip() or done.stderr.strip()
    answer = first_line(said) if said else f"status {done.returncode}"
    if "Authentication" in answer or "InvalidAuthToken" in answer or "Unauthenticated" in answer:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            raise PicogptError(f"the Ray cluster at {address} refused this machine's Ray token (~/.ray/auth_token, or "
                               f"$RAY_AUTH_TOKEN); give it the cluster's token: ray get-auth-token on the head prints "
                               f"it (docs/corpora.md)")
        raise PicogptError(f"the Ray cluster at {address} requires Ray's token authentication and picogpt sent no "
                           f"token; run it with RAY_AUTH_MODE=token and the cluster's token in ~/.ray/auth_token or "
                           f"$RAY_AUTH_TOKEN (docs/corpora.md)")
    raise PicogptError(f"the Ray cluster at {address} did not answer as one ({answer}); check the address: ray start "
                       f"--head prints it")


def _keeping_sigterm(init):
    """Run init() (a ray.init) keeping this process's SIGTERM handler: Ray's own exits with status 15,
    where picogpt says `terminated` and exits 143 with its files in order."""
    import signal
    try:
        handler = signal.getsignal(signal.SIGTERM)
    except ValueError:
        handler = None
    try:
        init()
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def _start_here(ray, options):
    """ray.init of a cluster on this machine, in this thread: Ray ties its processes' lives to the thread
    that starts them (PR_SET_PDEATHSIG), so it must be one that lives as long as the run."""
    try:
        _keeping_sigterm(lambda: ray.init(**options))
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        raise PicogptError(f"starting a Ray cluster on this machine failed: {first_line(e)}; start one with ray start "
                           f"--head and give --ray auto") from None


class _NotFromThisThread(logging.Filter):
    """Ray's note that it sets no SIGTERM handler when joined from a thread: picogpt keeps its own anyway."""

    def filter(self, record):
        return not record.getMessage().startswith("SIGTERM handler is not set")


def _init_in_time(ray, what, fix, options):
    """ray.init(**options) of a cluster elsewhere, given JOIN_SECONDS; the wait is in this thread, so Ctrl-C
    and SIGTERM stop it (ray.init retries for minutes where it gets no answer)."""
    logging.getLogger("ray._private.worker").addFilter(_NotFromThisThread())
    outcome = {}

    def init():
        try:
            ray.init(**options)
        except BaseException as e:  # noqa: B036 (reported by the waiting thread)
            outcome["error"] = e
    thread = threading.Thread(target=init, name="picogpt-ray-init", daemon=True)
    thread.start()
    deadline = time.monotonic() + JOIN_SECONDS
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
    finally:
        if thread.is_alive():  # ray.shutdown at exit would wait for the join that is stuck
            _forget_ray_at_exit(ray)
    if thread.is_alive():
        raise PicogptError(f"{what} did not finish in {JOIN_SECONDS} s; {fix}")
    if "error" in outcome:
        raise PicogptError(f"{what} failed: {first_line(outcome['error'])}; {fix}")


def _forget_ray_at_exit(ray):
    try:
        atexit.unregister(ray._private.worker.shutdown)
    except AttributeError:
        pass


# A local cluster's processes, stopped with the driver however it ends. Ray stops its head processes
# with the driver, but the agents they started (about 180 MB) outlive a driver killed outright, and
# ignore SIGTERM; this process, started before ray.init, notes the driver's Ray descendants while it
# runs and kills those left once the driver is gone (the pipe from it reads end-of-file).
WATCHDOG = r"""
import os, select, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
driver, me, seen = int(sys.argv[1]), os.getpid(), {}

def stat(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[1]), fields[19]  # parent, start time

def ray_descendants():
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = stat(entry)
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = {}, [driver]
    while frontier:
        pid = frontier.pop()
        for child, (parent, start) in parents.items():
            if parent == pid and child != me and child not in found:
                found[child] = start
                frontier.append(child)
    for pid in list(found):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ray" not in f.read():
                    del found[pid]
        except OSError:
            del found[pid]
    return found

while True:
    if select.select([0], [], [], 0.5)[0] and not os.read(0, 64):
        break
    seen.update(ray_descendants())
for pid, start in seen.items():
    try:
        if stat(pid)[1] == start:
            os.kill(pid, signal.SIGKILL)
    except (OSError, IndexError, ValueError):
        pass
"""
_watchdog = None


def watch_local_cluster():
    """Start the watchdog of the local cluster (Linux, where /proc lists processes); once per process."""
    global _watchdog
    if _watchdog is not None or not os.path.isdir("/proc/self"):
        return
    _watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid())], stdin=subprocess.PIPE,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


# ---------------------------------------------------------------------------------------------------
# The pool

def fit_actors(ray, workers, threads, say):
    """How many actors of `threads` CPUs the cluster can hold at once, at most `workers`: one line refuses
    a --threads-per-worker no node has, and one line says when fewer actors than asked for fit."""
    try:
        cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    except Exception:  # a Ray that cannot say: let the actors wait for CPUs
        return workers
    largest = int(max(cpus, default=0))
    if largest < threads:
        raise PicogptError(f"--threads-per-worker {threads} reserves {plural(threads, 'CPU')} for each actor, but the "
                           f"largest node of the Ray cluster has {largest}; give --threads-per-worker {largest} or "
                           f"less" if largest else "the Ray cluster has no CPUs for actors")
    room = int(sum(c // threads for c in cpus))
    if room < workers:
        say(f"the Ray cluster has CPUs for {plural(room, 'actor')} of {plural(threads, 'thread')} at once, not "
            f"{workers}: running {room}")
        return room
    return workers


class RayPool:
    """Actors on a Ray cluster, each with the model, running chunks: made (and the cluster joined, the
    request checked against it) before the output is touched, so that a job that cannot start leaves nothing."""

    def __init__(self, address, model_path, job_options, workers, threads, n_chunks=None, backend="numpy", bf16=None,
                 verbose=False, say=None):
        global _note
        self.actors, self.board = [], None
        self.ray = ray = connect(address, workers * threads, verbose)
        workers = fit_actors(ray, max(1, min(workers, n_chunks or workers)), threads, say or _say)
        _note = say  # Ray's notes from now on: through the progress bar
        model_file = open_model_file(model_path)
        self.weights = ray.put(dict(model_file.tensors))  # one copy in the object store, whatever the number of actors
        board = f"picogpt-progress-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.board = ray.remote(num_cpus=0)(ProgressBoard).options(name=board).remote([self.weights])
        worker = ray.remote(ChunkWorker).options(num_cpus=threads, max_restarts=-1, max_task_retries=-1)
        self.actors = [worker.remote(board, model_file.hparams, model_file.weight_dtype, job_options, threads,
                                     backend, bf16)
                       for _ in range(workers)]
        self.starting = {actor.ready.remote(): actor for actor in self.actors}

    def run(self, chunks, output, progress, memory=None):
        """Run the chunks on the actors and append their lines in plan order. memory: a dict that receives
        each actor's last (rss, pss) by process id."""
        ray, todo, results, pending, idle = self.ray, deque(chunks), {}, {}, []
        window = 2 * len(self.actors) + 2  # chunks done ahead of the next to write, at most
        next_index, written, last_poll, started = 0, [], 0.0, time.monotonic()
        under_way = {}  # chunk number -> (documents, tokens) the board last showed
        progress.status(f"starting {plural(len(self.actors), 'Ray actor')}")
        while next_index < len(chunks):
            while idle and todo and todo[0].number <= chunks[next_index].number + window:
                actor = idle.pop()
                pending[actor.run.remote(todo.popleft().to_json())] = actor
            waiting = list(self.starting) + list(pending)
            if not waiting:  # (cannot happen: the next chunk to write is always under way or done)
                raise PicogptError(f"chunk {chunks[next_index].number} was never run; run the same command again")
            done, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            for ref in done:
                if ref in self.starting:
                    actor, error = self.starting.pop(ref), ray.get(ref)
                    if error:
                        raise PicogptError(error)
                    idle.append(actor)
                    if len(idle) + len(pending) == 1:
                        progress.status("")
                    continue
                row, actor = ray.get(ref), pending.pop(ref)
                if "fatal" in row:
                    raise PicogptError(row["fatal"])
                results[row["number"]] = row
                idle.append(actor)
            while next_index < len(chunks) and chunks[next_index].number in results:
                chunk = chunks[next_index]
                row = results.pop(chunk.number)
                output.write(row["text"], chunk.n_docs)
                progress.update(chunk.n_docs, row["n_tokens"], row["n_errors"])
                written.append(chunk.number)
                under_way.pop(chunk.number, None)
                if memory is not None:
                    memory[row["pid"]] = (row["rss"], row["pss"])
                next_index += 1
            if time.monotonic() - last_poll > 0.5:
                last_poll = time.monotonic()
                self._show_progress(progress, under_way, written)
                if self.starting and not (idle or pending) and time.monotonic() - started > WAITING_NOTE_SECONDS:
                    progress.status(f"starting {plural(len(self.actors), 'Ray actor')}: {self._waiting_for()}")

    def _show_progress(self, progress, under_way, written):
        """Move the bar by the documents the actors have done in chunks not yet written."""
        try:
            board = self.ray.get(self.board.snapshot.remote(list(written)), timeout=5)
        except Exception:  # the board is busy or gone: the bar moves chunk by chunk meanwhile
            return
        written.clear()
        under_way.update((n, v) for n, v in board.items())
        shown = progress.docs + sum(d for d, _ in under_way.values())
        tokens = progress.tokens + sum(t for _, t in under_way.values())
        if shown > progress.shown_docs:
            progress.advance(shown - progress.shown_docs, max(0, tokens - progress.shown_tokens))

    def _waiting_for(self):
        try:
            free = self.ray.available_resources().get("CPU", 0)
            return f"waiting for CPUs that other work holds ({free:g} free)"
        except Exception:
            return "waiting for CPUs"

    def close(self):
        """Stop the actors (a cluster that outlives this run gets its CPUs back)."""
        global _note
        _note = None
        for actor in self.actors + ([self.board] if self.board is not None else []):
            try:
                self.ray.kill(actor)
            except Exception:
                pass


def run_on_ray(address, model_path, job_options, chunks, output, progress, workers, threads, memory=None,
               backend="numpy", bf16=None):
    """Run the chunks on the cluster's actors and append their lines in plan order, the actors computing with
    the given BLAS backend and bfloat16 choice ("native" or "widen", as the driver's model). memory: a dict
    that receives each actor's last (rss, pss) by process id."""
    pool = RayPool(address, model_path, job_options, workers, threads, n_chunks=len(chunks), backend=backend, bf16=bf16)
    try:
        pool.run(chunks, output, progress, memory)
    finally:
        pool.close()
