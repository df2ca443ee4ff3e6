"""`tandem`: serve, export-model, eval; and, against a running server, ingest, search, collections.

    tandem serve [--host H] [--port P] [--data-dir D] [--models-dir M] [--api-key K] ...
    tandem export-model --models-dir models
    tandem eval --dataset PATH [--models-dir models] [--url URL --modes dense,sparse,hybrid]
    tandem ingest FILE --collection NAME / search --collection NAME --text T / collections [NAME]

Every `serve` flag is also a `TANDEM_*` environment variable (flags win); `tandem serve --help`
lists them with their defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service import client_cli
from service.logs import configure_logging
from service.settings import Settings

logger = logging.getLogger("service.cli")


def _serve_parser(sub: Any, command: str = "serve") -> Any:
    p = sub.add_parser(
        command, help="start the HTTP service" if command == "serve" else
        "serve the same API sharded and replicated on Ray (needs the 'cluster' extra)",
        description="Start the HTTP service. Every flag is also an environment variable (shown in "
        "brackets); a flag wins over the variable.",
    )
    for name, field in Settings.model_fields.items():
        env = f"TANDEM_{name.upper()}"
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = f"{field.description} [{env}; default: {default if default is not None else 'unset'}]"
        if field.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)
    return p


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def serve(settings: Settings) -> int:
    import uvicorn

    from service.app import create_app

    configure_logging(settings.log_level)
    if settings.model_dir is not None and not (settings.model_dir / "model.onnx").is_file():
        logger.error(
            "no model at %s: run `tandem export-model --models-dir %s` (./dev up does it), "
            "or start with --encoder '' to serve vectors only",
            settings.model_dir / "model.onnx", settings.models_dir,
        )
        return 2
    effective = settings.model_dump(mode="json")
    effective["api_key"] = "***" if settings.api_key is not None else None
    logger.info("configuration: %s", json.dumps(effective, sort_keys=True))
    # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight requests finish for up to
    # timeout_graceful_shutdown seconds, then runs the lifespan's shutdown (closing collections).
    uvicorn.run(
        create_app(settings), host=settings.host, port=settings.port, log_config=None,
        access_log=False, timeout_graceful_shutdown=settings.shutdown_timeout_s, lifespan="on",
        server_header=False,
    )
    return 0


def cluster(settings: Settings, args: argparse.Namespace) -> int:
    try:
        from service.cluster import serve as cluster_serve
    except ImportError:
        logger.error("cluster mode needs Ray: pip install 'tandem[cluster]'")
        return 2
    configure_logging(settings.log_level)
    try:
        options = cluster_serve.ClusterOptions.parse(
            shards=args.shards, replicas=args.replicas, shard_timeout_s=args.shard_timeout_s,
            router_replicas=args.router_replicas, encoder_max_replicas=args.encoder_max_replicas,
            write_quorum=args.write_quorum, ingest_actors=args.ingest_actors,
        )
    except ValueError as exc:
        print(f"tandem cluster: {exc}", file=sys.stderr)
        return 2
    cluster_serve.run(settings, options, address=args.address)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem", description="tandem vector retrieval service")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    cl = _serve_parser(sub, "cluster")
    cl.add_argument("--shards", type=int, default=1, help="physical shards (points go by a hash of their id)")
    cl.add_argument("--replicas", type=int, default=1, help="copies of each shard, written together")
    cl.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    cl.add_argument("--shard-timeout-s", type=float, default=5.0, help="a copy slower than this is retried elsewhere")
    cl.add_argument("--router-replicas", type=int, default=1, help="replicas of the router (FastAPI ingress)")
    cl.add_argument("--encoder-max-replicas", type=int, default=4,
                    help="the encoder deployment autoscales between 1 and this many replicas; 0: no encoder "
                         "deployment, the routers encode (one hop fewer a text query)")
    cl.add_argument("--ingest-actors", type=int, default=4,
                    help="file ingestion (Ray Data) encodes on up to this many actors, one CPU each")
    cl.add_argument("--write-quorum", default="1",
                    help="copies of a shard that must make a write durable before it is acknowledged: a number "
                         "from 1 to --replicas, 'majority' or 'all' (default 1: writes go on while one copy lives)")
    exp = sub.add_parser("export-model", help="export all-MiniLM-L6-v2 to ONNX (needs the 'export' extra)")
    exp.add_argument("--models-dir", type=Path, default=Path("models"), help="where the model folder goes")
    exp.add_argument("--name", default="minilm", help="name of the model folder")
    ev = sub.add_parser("eval", help="retrieval quality (nDCG@10...) on a BEIR-format dataset")
    ev.add_argument("--dataset", type=Path, required=True, help="folder with corpus, queries, qrels")
    ev.add_argument("--models-dir", type=Path, default=Path("models"))
    ev.add_argument("--model", default="minilm")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--url", default=None,
                    help="evaluate through this running server instead (dense, sparse and hybrid modes)")
    ev.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"), help="with --url (TANDEM_API_KEY)")
    ev.add_argument("--modes", default="dense,sparse,hybrid", help="with --url: comma-separated search modes")
    client_cli.add_parsers(sub)
    args = parser.parse_args(argv)
    if args.command in ("ingest", "search", "collections"):
        return client_cli.run(args)

    if args.command in ("serve", "cluster"):
        try:
            settings = build_settings(args)
        except ValidationError as exc:
            # Not str(exc): it echoes the input values, and one of them may be the API key.
            for e in exc.errors(include_input=False, include_url=False):
                where = ".".join(str(x) for x in e["loc"]) or "settings"
                print(f"tandem {args.command}: {where}: {e['msg']}", file=sys.stderr)
            return 2
        if args.command == "cluster":
            return cluster(settings, args)
        return serve(settings)
    configure_logging("info")
    if args.command == "export-model":
        from service.model_export import run_export

        run_export(args.models_dir, args.name)
        return 0
    from service.evaluate import run_eval_cli, run_http_eval

    if args.url is not None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
        run_http_eval(args.dataset, args.url, api_key=args.api_key, modes=args.modes.split(","), encoder=args.model)
        return 0
    run_eval_cli(args.dataset, args.models_dir, model=args.model, threads=args.threads)  # prints its table
    return 0


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
