"""Ray Serve shell around `kvray.serve.api` (docs/architecture.md, section 7): two deployments.

* `CompressedLM` hosts one base model per replica (`load_model` once, in the constructor) and
  serves every policy on it: the policy travels with each job (the ingress reads it from the
  store on every request), so tuned policies are multiplexed by id over one model and new policy
  files are served without a restart or a redeploy. The replica runs a `BatchingEngine`
  (continuous batching, `kvray.serve.engine`): each request is prefilled and compressed with its
  own press between decode steps and joins the running batch; admission is by KV bytes
  (KVRAY_KV_BUDGET_BYTES, default from the device's memory), so a policy that keeps a quarter
  of the cache admits about four times the concurrent requests of the full cache.
  `check_health` fails after an unrecoverable device error so Serve replaces the replica.
* `KVRayAPI` is the FastAPI ingress (`build_api`, built on the replica by
  `__serve_build_asgi_app__`), with `max_ongoing_requests` / `max_queued_requests` so that
  overload is answered 503 ("Request dropped due to backpressure") instead of queueing without
  bound; it must be set on the ingress (on the inner deployment the router's queue
  absorbs the load). Streaming responses go through the handle as generators
  (`handle.options(stream=True)`); a client that disconnects cancels its row.

No `@serve.batch`: the engine batches at the granularity that matters for decoding (one token of
every active request per step, requests joining and leaving between steps), which a
request-level batch cannot do.

Run it:

    KVRAY_POLICIES=runs/policies serve run kvray.serve.app:app       # env: KVRAY_MODEL, KVRAY_API_KEY, ...
    python -c "from kvray.serve import deploy; deploy('runs/policies')"

Environment read by the module-level `app`: KVRAY_POLICIES (policy directory, default
runs/policies, made absolute), KVRAY_MODEL (default: the embedded SmolLM2-135M), KVRAY_API_KEY
(read by the ingress replica from its own environment), KVRAY_NUM_GPUS (per model replica,
default 0), KVRAY_CPUS (per model replica, default 1; also its torch threads),
KVRAY_MAX_REPLICAS (model replicas, default 1), KVRAY_REQUEST_TIMEOUT_S, KVRAY_KV_BUDGET_BYTES (KV
bytes one replica's batch may hold), KVRAY_MAX_ROWS (rows decoded together, default 64).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from .api import DEFAULT_STORE, GenerateJob, GenerateResult, ModelBackend, RequestError, build_api

MODEL_DEPLOYMENT = "CompressedLM"
INGRESS_DEPLOYMENT = "KVRayAPI"
APP_NAME = "kvray"
HEAD_NODE_RESOURCE = "node:__internal_head__"

# The ingress only awaits the model replicas: requests in flight are cheap there; beyond ongoing +
# queued the proxy answers 503 at once.
INGRESS_MAX_ONGOING = 64
INGRESS_MAX_QUEUED = 64
# Requests inside one model replica: the engine's rows (KVRAY_MAX_ROWS, 64) plus those waiting for
# KV budget; the engine admits them, Serve only forwards.
MODEL_MAX_ONGOING = 128


@serve.deployment(
    name=MODEL_DEPLOYMENT,
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=MODEL_MAX_ONGOING,
    autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": 1,
                        "target_ongoing_requests": 32, "upscale_delay_s": 30, "downscale_delay_s": 600},
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class CompressedLM:
    """One base model per replica; any policy per request."""

    def __init__(self, model: str | None = None, threads: int | None = None, kv_budget: int | None = None,
                 max_rows: int | None = None, batching: bool = True):
        import torch

        from ..models import load_model

        if threads:
            torch.set_num_threads(int(threads))
        self.backend = ModelBackend(load_model(model), kv_budget=kv_budget, max_rows=max_rows, batching=batching)
        if batching:
            self.backend.engine  # noqa: B018 -- start the engine thread now, not on the first request

    async def generate(self, job: GenerateJob) -> GenerateResult:
        return await self.backend.generate(job)

    async def generate_stream(self, job: GenerateJob):
        async for event in self.backend.generate_stream(job):
            yield event

    def stats(self) -> dict:
        return {**self.backend.stats(), "model": self.backend.model_name, "batching": self.backend.batching}

    async def context_nll(self, context: str) -> float:
        return await self.backend.context_nll(context)

    async def probe(self, context: str, calibrator: dict):
        return await self.backend.probe(context, calibrator)

    def check_health(self) -> None:
        self.backend.check_health()


class HandleBackend:
    """The API's backend under Serve: forwards to `CompressedLM` through its handle and gives
    back the replica's `RequestError` itself (Ray wraps it; the original is `.cause`)."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle
        self.model_name: str | None = None  # learnt from the replica on the first stream

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.handle, method).remote(*args)
        except RequestError as exc:
            cause = getattr(exc, "cause", exc)
            raise (cause if isinstance(cause, RequestError) else RequestError(str(exc))) from None

    async def generate(self, job: GenerateJob) -> GenerateResult:
        return await self._call("generate", job)

    async def generate_stream(self, job: GenerateJob):
        if self.model_name is None:  # streamed chunks name the model before the result does
            self.model_name = (await self.stats()).get("model")
        events = self.handle.options(stream=True).generate_stream.remote(job)
        try:
            async for event in events:
                yield event
        except RequestError as exc:
            cause = getattr(exc, "cause", exc)
            raise (cause if isinstance(cause, RequestError) else RequestError(str(exc))) from None
        finally:
            events.cancel()  # the consumer left early (client gone, timeout): cancel the replica's row

    async def context_nll(self, context: str) -> float:
        return await self._call("context_nll", context)

    async def probe(self, context: str, calibrator: dict):
        return await self._call("probe", context, calibrator)

    async def stats(self) -> dict:
        return await self._call("stats")


# The ingress reads the policy store from its node's disk: pinned to the head node, where
# jobs/calibrate.py (a job driver) writes the policies (elsewhere: a shared file system).
# num_cpus 0: it only awaits the model replicas, and cluster.yaml's head advertises no CPU.
@serve.deployment(
    name=INGRESS_DEPLOYMENT,
    ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}},
    max_ongoing_requests=INGRESS_MAX_ONGOING,
    max_queued_requests=INGRESS_MAX_QUEUED,
    num_replicas=1,  # one async replica is plenty, and keeps the 503 bound at ongoing + queued
)
@serve.ingress()
class KVRayAPI:
    """The HTTP ingress: `build_api` over the `CompressedLM` handle."""

    def __init__(self, lm: DeploymentHandle, policies_dir: str, api_key: str | None = None,
                 request_timeout_s: float | None = None):
        self._backend = HandleBackend(lm)
        self._policies_dir = policies_dir
        self._api_key = api_key
        self._timeout = request_timeout_s

    def __serve_build_asgi_app__(self):
        return build_api(self._policies_dir, api_key=self._api_key, backend_provider=lambda: self._backend,
                         request_timeout_s=self._timeout)


def _env_int(value: int | None, env: str) -> int | None:
    if value is None and os.environ.get(env):
        value = os.environ[env]
    if value is None:
        return None
    try:
        out = int(float(value))
    except ValueError:
        raise ValueError(f"{env} must be a positive integer, got {value!r}") from None
    if out < 1:
        raise ValueError(f"{env} must be a positive integer, got {value!r}")
    return out


def store_path(policies_dir: str | os.PathLike | None = None) -> Path:
    """The policy directory: the argument, else env KVRAY_POLICIES, else runs/policies; absolute
    (replicas may run in another directory)."""
    return Path(policies_dir or os.environ.get("KVRAY_POLICIES") or DEFAULT_STORE).expanduser().resolve()


def replica_resources(cpus: float | None = None, num_gpus: float | None = None) -> dict[str, float]:
    """What one model replica asks Ray for: the arguments, else env KVRAY_CPUS (1) / KVRAY_NUM_GPUS (0)."""
    need = {"CPU": float(cpus if cpus is not None else os.environ.get("KVRAY_CPUS", 1)),
            "GPU": float(num_gpus if num_gpus is not None else os.environ.get("KVRAY_NUM_GPUS", 0))}
    if not need["CPU"] > 0 or need["GPU"] < 0:
        raise ValueError(f"a model replica needs cpus > 0 and num_gpus >= 0, got {need}")
    return need


def build_app(policies_dir: str | os.PathLike | None = None, model: str | None = None, *,
              api_key: str | None = None, num_gpus: float | None = None, max_replicas: int | None = None,
              cpus: float | None = None, threads: int | None = None, request_timeout_s: float | None = None,
              max_ongoing_requests: int = INGRESS_MAX_ONGOING, max_queued_requests: int = INGRESS_MAX_QUEUED,
              kv_budget: int | None = None, max_rows: int | None = None, batching: bool = True):
    """The bound application. Defaults come from the environment (see the module docstring).
    `api_key=None` lets the ingress replica read KVRAY_API_KEY from its own environment (an
    explicit key becomes part of the deployment's arguments, visible on the Ray dashboard).
    `max_ongoing_requests` / `max_queued_requests`: the ingress's limits (beyond their sum, 503);
    `kv_budget` (bytes) / `max_rows`: one model replica's batching engine (env KVRAY_KV_BUDGET_BYTES /
    KVRAY_MAX_ROWS, else from the device's memory / 64); `batching=False`: one request at a time
    per replica (the path before the engine, for comparison)."""
    if max_ongoing_requests < 1 or max_queued_requests < 0:
        raise ValueError(f"max_ongoing_requests must be >= 1 and max_queued_requests >= 0, got "
                         f"{max_ongoing_requests} and {max_queued_requests}")
    store = store_path(policies_dir)
    model = model or os.environ.get("KVRAY_MODEL") or None
    if model is not None and Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())  # replicas may run in another directory
    replicas = int(max_replicas if max_replicas is not None else os.environ.get("KVRAY_MAX_REPLICAS", 1))
    if replicas < 1:
        raise ValueError(f"max_replicas must be >= 1 (min_replicas is 1: a cold start loads the model), got {replicas}")
    timeout = request_timeout_s if request_timeout_s is not None else os.environ.get("KVRAY_REQUEST_TIMEOUT_S")
    need = replica_resources(cpus, num_gpus)
    threads = threads or max(1, int(need["CPU"]))  # torch threads = the CPUs Ray reserved for the replica
    lm = CompressedLM.options(
        ray_actor_options={"num_cpus": need["CPU"], "num_gpus": need["GPU"]},
        autoscaling_config={"min_replicas": 1, "initial_replicas": 1, "max_replicas": replicas,
                            "target_ongoing_requests": 32, "upscale_delay_s": 30, "downscale_delay_s": 600},
    ).bind(model, threads, _env_int(kv_budget, "KVRAY_KV_BUDGET_BYTES"), _env_int(max_rows, "KVRAY_MAX_ROWS"),
           bool(batching))
    ingress = KVRayAPI.options(max_ongoing_requests=max_ongoing_requests, max_queued_requests=max_queued_requests)
    return ingress.bind(lm, str(store), api_key, float(timeout) if timeout is not None else None)


def deploy(policies_dir: str | os.PathLike, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
           *, api_key: str | None = None, name: str = APP_NAME, route_prefix: str = "/", blocking: bool = False,
           request_timeout_s: float | None = None, **app_options) -> DeploymentHandle:
    """Start Serve's HTTP proxy on host:port (a no-op when Serve already runs on this Ray
    cluster: its HTTP options cannot change) and deploy (or update) the app; returns the ingress
    handle once the app is RUNNING. `request_timeout_s` bounds the model work per request (504);
    the proxy's own bound (408, queueing included) is set a little longer when this call starts it."""
    http = {"host": host, "port": int(port)}
    if request_timeout_s is not None:
        http["request_timeout_s"] = float(request_timeout_s) + 30.0
    need = replica_resources(app_options.get("cpus"), app_options.get("num_gpus"))
    free = ray.available_resources()
    short = {k: v for k, v in need.items() if v > free.get(k, 0.0) + 1e-9}
    if short:  # Serve waits for them without a word: say why it may take a while
        print(f"[kvray serve] the model replica needs {need} and the cluster has free "
              f"{ {k: round(free.get(k, 0.0), 2) for k in need} }: the app starts when they are free "
              "(e.g. when a running job's model actors finish)", file=sys.stderr, flush=True)
    serve.start(http_options=http)
    return serve.run(build_app(policies_dir, model, api_key=api_key, request_timeout_s=request_timeout_s,
                               **app_options),
                     name=name, route_prefix=route_prefix, blocking=blocking)


def local_url(host: str, port: int) -> str:
    """Where a client on this machine reaches the proxy (a wildcard bind is reached on 127.0.0.1)."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


# The README's example request (the job checks every policy it emits against it).
EXAMPLE = {"context": "Our office moved twice this year. The vault code is 4711. The cafeteria opens at nine.",
           "question": "What is the vault code?", "max_new_tokens": 16, "answer": "4711"}


def example_curl(base_url: str, policy_id: str | None, api_key_set: bool = False) -> str:
    """A copy-pasteable request to /v1/generate (the README's, printed by `kvray serve`)."""
    import json

    body = {"policy": policy_id} if policy_id else {"method": "snapkv", "compression_ratio": 0.5}
    body.update(context=EXAMPLE["context"], question=EXAMPLE["question"], max_new_tokens=EXAMPLE["max_new_tokens"])
    key = " -H \"x-api-key: $KVRAY_API_KEY\"" if api_key_set else ""
    return f"curl -s {base_url}/v1/generate -H 'content-type: application/json'{key} -d '{json.dumps(body)}'"


def _ray_is_running() -> bool:
    """Whether `ray.init()` would attach to a running cluster (RAY_ADDRESS, or a head started
    with `ray start` on this machine) rather than start a private one."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is not None
    except Exception:  # noqa: BLE001 -- no cluster file, no address: a private Ray
        return False


def serve_locally(policies_dir: str | os.PathLike | None = None, model: str | None = None, host: str = "127.0.0.1",
                  port: int = 8000, *, address: str | None = None, detach: bool = False, name: str = APP_NAME,
                  echo=print, **app_options) -> int:
    """`kvray serve`: attach to the running Ray cluster (or start a private one), deploy the app
    on host:port, print where it is, the policies and a curl to try, then serve until Ctrl-C /
    SIGTERM (and remove what it started), or return at once with `detach` (needs a running
    cluster: a private Ray ends with this process). `address`: None or "auto" = a running
    cluster if there is one, else a private Ray; "local" = always a private Ray; else the
    cluster at that address."""
    import signal
    import time

    from ..policy import PolicyStore

    store = store_path(policies_dir)
    if address in (None, "auto"):
        attached = _ray_is_running()
    else:
        attached = address != "local"
    if detach and not attached:
        raise SystemExit("kvray serve --detach needs a running Ray cluster (e.g. `RAY_AUTH_MODE=token ray start "
                         "--head`, or the one `make calibrate` starts): a Ray started by this process stops with it")
    ray.init(address=(address if address not in (None, "auto") else "auto") if attached else "local",
             log_to_driver=False, namespace="kvray-serve")
    echo(f"[kvray serve] {'attached to the running Ray cluster' if attached else 'started a private Ray'}; "
         f"deploying app {name!r} on http://{host}:{port} (model {model or 'embedded SmolLM2-135M-Instruct'}) ...")
    ids = PolicyStore(store).ids() if store.is_dir() else []
    deploy(store, model, host, port, name=name, **app_options)
    base = local_url(host, port)
    echo(f"[kvray serve] ready: {base}  (OpenAPI docs {base}/docs)")
    echo(f"[kvray serve] policy store {store}: " + (", ".join(ids) if ids else
         "no policies yet (run `make calibrate`; new files are served without a restart)"))
    echo("[kvray serve] try:\n  " + example_curl(base, ids[0] if ids else None,
                                                  bool(app_options.get("api_key") or os.environ.get("KVRAY_API_KEY"))))
    if detach:
        echo(f"[kvray serve] detached: the app keeps running on the cluster; remove it with "
             f"`serve shutdown` or `python -c \"from ray import serve; serve.delete('{name}')\"`")
        return 0

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    echo("[kvray serve] serving; Ctrl-C stops it")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        echo("[kvray serve] stopping ...")
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            serve.delete(name)
            if not attached or not serve.status().applications:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0


app = build_app()

__all__ = ["CompressedLM", "KVRayAPI", "HandleBackend", "build_app", "deploy", "serve_locally", "example_curl", "app",
           "MODEL_DEPLOYMENT", "INGRESS_DEPLOYMENT", "APP_NAME"]
