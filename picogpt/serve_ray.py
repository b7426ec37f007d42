"""`picogpt serve --ray ADDRESS --replicas N`: the same app (picogpt.serve) as a Ray Serve deployment, for
when one machine is not enough.

Each replica is a Ray actor holding one Engine (its own continuous batch) and the app over it; Ray Serve's
proxy on each node spreads requests over the replicas and replaces one that dies. The weights go into Ray's
object store once, from the driver, as the corpus jobs put them there (picogpt.corpus_ray): every replica on
a node maps the same copy, read-only, so N replicas on a node cost one model's memory, not N. A small named
actor holds the reference, so that a replica Ray Serve restarts finds the weights again.

The only module besides corpus_ray that imports Ray, and only inside its functions.
"""

import threading
from types import SimpleNamespace

from . import blas
from .corpus_ray import connect
from .errors import PicogptError, first_line
from .model import GPT2
from .modelfile import open_model_file
from .precision import weights_for_backend
from .scheduler import Engine
from .serve import make_app

APP_NAME = "picogpt"
NAMESPACE = "picogpt"  # the weights' holder's (the replicas run in Ray Serve's namespace, the driver in its own)


_holder = None  # the WeightsHolder of this process's deployment


class WeightsHolder:
    """A Ray actor that keeps the reference to the weights in the object store (its only job)."""

    def __init__(self, weights):
        self._weights = weights  # [ObjectRef]: inside a list, so that Ray hands over the reference, not the value

    def weights(self):
        return self._weights


class Replica:
    """One copy of the server: the model made from the object store's weights (no copy), an Engine, the app."""

    def __init__(self, holder, hparams, weight_dtype, model_id, api_key, max_rows, threads, backend):
        import ray
        (weights,) = ray.get(ray.get_actor(holder, namespace=NAMESPACE).weights.remote())
        blas.use(backend, threads=threads)
        tensors, precision = weights_for_backend(SimpleNamespace(tensors=ray.get(weights), weight_dtype=weight_dtype,
                                                                 path=None), None)
        model = GPT2(hparams, tensors)
        model.precision = precision
        self.engine = Engine(model, max_rows=max_rows).start()
        self.picogpt_app = make_app(self.engine, model_id, api_key)  # (Ray Serve's wrapper has its own .app)

    def __serve_build_asgi_app__(self):  # Ray Serve asks for the app once the replica is made
        return self.picogpt_app

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def deploy(ray, model, model_id, replicas, host="127.0.0.1", port=8000, api_key=None, max_rows=16, threads=1,
           backend="numpy"):
    """Run the app on the cluster ray is connected to, as N replicas behind Ray Serve's proxy at host:port;
    returns once every replica is running (or raises PicogptError)."""
    from ray import serve

    model_file = open_model_file(model.path)
    weights = ray.put(dict(model_file.tensors))  # one copy per node, whatever the number of replicas
    holder = f"{APP_NAME}-weights"
    try:
        ray.kill(ray.get_actor(holder, namespace=NAMESPACE))
    except ValueError:  # none from an earlier run
        pass
    global _holder  # a named actor lives as long as a handle to it does: this process keeps one while it serves
    _holder = ray.remote(num_cpus=0)(WeightsHolder).options(name=holder, namespace=NAMESPACE).remote([weights])
    ray.get(_holder.weights.remote())  # (registered under its name before any replica looks for it)
    serve.start(http_options=dict(host=host, port=port))
    ingress = serve.ingress()(Replica)
    deployment = serve.deployment(name="PicogptServer", num_replicas=replicas, max_ongoing_requests=4 * max_rows,
                                  ray_actor_options=dict(num_cpus=threads))(ingress)
    app = deployment.bind(holder, model_file.hparams, model_file.weight_dtype, model_id, api_key, max_rows, threads,
                          backend)
    try:
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        # (serve.run returns once the application is running: every replica made)
    except Exception as e:  # noqa: BLE001 (Ray Serve's own errors: one line)
        raise PicogptError(f"Ray Serve could not start {replicas} replicas: {first_line(e)}; check the cluster's "
                           f"free CPUs (each replica takes --threads) and memory") from None


def replicas_running(ray):
    """How many of the app's replicas Ray Serve reports running."""
    from ray import serve
    try:
        application = serve.status().applications[APP_NAME]
    except KeyError:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in application.deployments.values())


def shutdown(ray):
    global _holder
    from ray import serve
    serve.shutdown()
    if _holder is not None:
        ray.kill(_holder)
        _holder = None


def run(address, model, model_id, replicas, host="127.0.0.1", port=8000, api_key=None, max_rows=16, threads=1,
        backend="numpy", say=print):
    """`picogpt serve --ray`: deploy, say where it listens, serve until SIGTERM or Ctrl-C, then shut Serve down."""
    import logging
    import signal

    ray = connect(address, replicas * threads)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # (its INFO lines: every start and connection)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deploy(ray, model, model_id, replicas, host, port, api_key, max_rows, threads, backend)
        key = "an API key is required" if api_key else "no API key"
        say(f"listening on http://{host}:{port} (Ray Serve, {replicas} replicas of model {model_id}; {key}; Ctrl-C "
            f"or SIGTERM stops it)")
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutdown(ray)
    return 0
