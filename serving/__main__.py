"""Serve a trained ADN over HTTP with Ray Serve, picking its depth per batch to meet each request's deadline.

  python -m serving --checkpoint runs/demo --pareto runs/demo/pareto-cpu --slo-ms 50
  python -m serving --model-uri models:/adn-resnet_mini/1 --policy fixed --mask TTFF

Runs in the foreground until Ctrl-C or SIGTERM (make serve starts it in the background). Endpoints:
POST /v1/classify (one JPEG or PNG; header X-Deadline-Ms), GET /v1/model, and Ray Serve's /-/healthz.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from dataclasses import fields

from .policy import ON_LATE
from .settings import POLICIES, ServeSettings

READY = "ADN serving at"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to serve")
    src.add_argument("--checkpoint", help="a training output directory (or its weights.safetensors)")
    src.add_argument("--pareto", help="the front: pareto.json or its directory (default: the first pareto-*/ "
                                      "beside the checkpoint, or the registered front of --target)")
    src.add_argument("--model-uri", help="a registered version, models:/NAME/VERSION (python -m serving.register)")
    src.add_argument("--tracking-uri", help="the MLflow store of --model-uri (default: MLFLOW_TRACKING_URI, "
                                            "else sqlite:///./mlflow.db)")
    src.add_argument("--target", default="cpu", help="the target the front was searched for (default: cpu)")
    pol = p.add_argument_group("policy")
    pol.add_argument("--policy", default="deadline", choices=POLICIES,
                     help="deadline: the most accurate front mask that meets the tightest deadline in the batch; "
                          "fixed: always --mask (a baseline)")
    pol.add_argument("--mask", help="the mask of --policy fixed, e.g. TTFF")
    pol.add_argument("--slo-ms", type=float, default=100.0, help="deadline of a request without X-Deadline-Ms")
    pol.add_argument("--on-late", default="shed", choices=ON_LATE,
                     help="a request no mask can answer in time: shed (HTTP 503) or serve it late")
    pol.add_argument("--margin-ms", type=float, default=3.0,
                     help="slack kept for the way back to the client (default 3 ms)")
    pol.add_argument("--calm-s", type=float, default=0.5,
                     help="after a shed, a miss or a long queue the slowest mask allowed falls halfway to the "
                          "fastest mask's time; one slower mask comes back per calm period of this many seconds "
                          "(default 0.5)")
    pol.add_argument("--pressure", type=float, default=0.5,
                     help="a request that waited more than this share of its deadline counts as trouble "
                          "(default 0.5)")
    pol.add_argument("--speed-tolerance", type=float, default=0.1,
                     help="masks within this share of the fastest mask's time always stay allowed: they serve about "
                          "as many requests (default 0.1)")
    bat = p.add_argument_group("batching and replicas")
    bat.add_argument("--max-batch", type=int, default=16, help="largest batch (@serve.batch max_batch_size)")
    bat.add_argument("--batch-wait-ms", type=float, default=0.0,
                     help="longest wait to fill a batch (default 0: a batch takes what queued while the last one ran)")
    bat.add_argument("--replicas", type=int, default=1, help="replicas of the deployment")
    bat.add_argument("--threads", type=int, default=1, help="CPUs (and torch threads) per replica")
    bat.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per replica)")
    bat.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger bodies get HTTP 413")
    bat.add_argument("--latency-budget-s", type=float, default=20.0,
                     help="time each replica may spend measuring its masks' latency at start")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1; 0.0.0.0 for all)")
    net.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    net.add_argument("--ray-address", help="an existing Ray cluster (make ray-head); default: a local one")
    net.add_argument("--ingress", choices=("proxy", "haproxy"),
                     help="the local Ray's HTTP ingress: proxy (default), Ray Serve's Python proxy actor; haproxy, "
                          "HAProxy straight to the replicas, about 7 ms faster a request on a 2-core machine, whose "
                          "stats and metrics listeners bind every interface on free ports (Ray's own; a cluster's "
                          "nodes choose at ray start, and make ray-head starts them with haproxy)")
    net.add_argument("--metrics-port", type=int,
                     help="the local Ray's Prometheus endpoint, http://127.0.0.1:PORT/metrics (adn_* and Ray Serve's "
                          "own metrics; default: a free port, printed at start; a cluster's nodes export on the port "
                          "of ray start --metrics-export-port)")
    p.add_argument("--check", action="store_true", help="check every input and exit (0: it would serve)")
    return p


def settings_from(args: argparse.Namespace) -> ServeSettings:
    names = {f.name for f in fields(ServeSettings)}
    return ServeSettings(**{k: v for k, v in vars(args).items() if k in names})


def preflight(settings: ServeSettings) -> None:
    """Every input checked before Ray starts: settings, weights, front, registry name, fixed mask."""
    from .model import ServedModel, locate

    settings.check()
    weights, front = locate(settings.checkpoint, settings.pareto, settings.model_uri, settings.target,
                            settings.tracking_uri)
    ServedModel(weights, front, settings.target, "cpu", settings.mask if settings.policy == "fixed" else None)


def serve_forever(settings: ServeSettings, host: str, port: int, ray_address: str | None,
                  metrics_port: int | None = None) -> None:
    """Start Ray (or join ``ray_address``) and Ray Serve on ``host:port``; block until SIGINT or SIGTERM."""
    from ray import serve

    from search.ray_client import connect

    from .app import deployment

    connect(ray_address, metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(settings), name="adn", route_prefix="/")
        print(f"{READY} http://{host}:{port}/v1/classify (model: GET /v1/model, health: GET /-/healthz); "
              "Ctrl-C stops it.", flush=True)
        if not ray_address:
            import ray

            exported = next((n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")), None)
            print(f"Prometheus metrics (adn_* and Ray Serve's): http://127.0.0.1:{exported}/metrics", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = settings_from(args)
    try:
        if args.ray_address and args.ingress:
            raise ValueError("--ingress applies to a local Ray; the nodes of --ray-address chose theirs at ray start.")
        if not args.ray_address:
            from search.ray_client import serve_ingress_env

            os.environ.update(serve_ingress_env(args.ingress or "proxy", free_ports=True))
        preflight(settings)
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be 1 to 65535, got {args.port}.")
        from pipeline.distributed import port_taken

        if args.metrics_port is not None:
            if args.ray_address:
                raise ValueError("--metrics-port applies to a local Ray; the nodes of --ray-address export on the "
                                 "port of their ray start --metrics-export-port.")
            if not 0 < args.metrics_port < 65536 or args.metrics_port == args.port:
                raise ValueError(f"--metrics-port must be 1 to 65535 and not --port, got {args.metrics_port}.")
            if port_taken("127.0.0.1", args.metrics_port):
                raise ValueError(f"--metrics-port {args.metrics_port} is taken; pass another.")
        if port_taken(args.host, args.port):
            raise ValueError(f"port {args.port} on {args.host} is taken; stop what listens there or pass --port.")
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.check:
        return 0
    serve_forever(settings, args.host, args.port, args.ray_address, args.metrics_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
