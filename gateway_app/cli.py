"""The `llm-gateway` command: `serve`, `simulate` and `demo`.

These names and flags are a contract: the chart, the docs and the benchmark call them.
"""

from __future__ import annotations

import argparse
import os
import sys

ENGINE_KINDS = ("vllm", "sglang")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path of the routing map (YAML or JSON)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.add_argument(
        "--log-format", choices=("json", "text"), default=os.environ.get("LLM_GATEWAY_LOG_FORMAT") or None,
        help="json (one object per line) or text; default: text on a terminal, json otherwise",
    )
    serve.add_argument(
        "--otlp-endpoint", default=os.environ.get("LLM_GATEWAY_OTLP_ENDPOINT") or None,
        help="send OpenTelemetry traces (OTLP over HTTP) to this collector, e.g. http://otel-collector:4318; "
        "off by default; needs `pip install 'llm-gateway[tracing]'` (env LLM_GATEWAY_OTLP_ENDPOINT)",
    )
    serve.add_argument(
        "--no-access-log", dest="access_log", action="store_false",
        help="do not write the one line per request (errors and warnings are still logged)",
    )
    serve.add_argument(
        "--shutdown-grace-seconds", type=float, default=110.0,
        help="on SIGTERM, stop accepting at once and give requests and streams in flight this long to finish "
        "(keep it below the pod's terminationGracePeriodSeconds minus its preStop wait)",
    )
    serve.add_argument(
        "--keys-file", default=os.environ.get("LLM_GATEWAY_KEYS_FILE"),
        help="YAML file of client API keys (sha256 hashes), mounted from a Secret; turns authentication on "
        "(env LLM_GATEWAY_KEYS_FILE)",
    )
    serve.add_argument(
        "--engine-api-key-file", default=os.environ.get("LLM_GATEWAY_ENGINE_API_KEY_FILE"),
        help="file holding the key the gateway sends to engines started with --api-key "
        "(env LLM_GATEWAY_ENGINE_API_KEY_FILE)",
    )
    serve.add_argument(
        "--redis-url", default=os.environ.get("LLM_GATEWAY_REDIS_URL"),
        help="redis://host:6379/0 to share rate-limit counters between replicas; the password comes from "
        "env LLM_GATEWAY_REDIS_PASSWORD (env LLM_GATEWAY_REDIS_URL)",
    )

    simulate = commands.add_parser("simulate", help="run an engine simulator (vLLM or SGLang look-alike)")
    simulate.add_argument("--engine", required=True, choices=ENGINE_KINDS)
    simulate.add_argument("--model", required=True, help="the model id the simulated engine serves")
    simulate.add_argument("--host", default="0.0.0.0")
    simulate.add_argument("--port", type=int, default=8000)
    simulate.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    simulate.add_argument("--itl-ms", type=float, default=0.0, help="delay between two tokens")
    simulate.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    simulate.add_argument(
        "--api-key", default=os.environ.get("LLM_GATEWAY_SIMULATOR_API_KEY") or None,
        help="require this key on /v1 routes, like vLLM's and SGLang's --api-key (env LLM_GATEWAY_SIMULATOR_API_KEY)",
    )

    hash_key = commands.add_parser("hash-key", help="print the sha256 of an API key, for the keys file")
    hash_key.add_argument("key", nargs="?", help="the key (read from standard input when left out)")
    hash_key.add_argument("--generate", action="store_true", help="make a new random key and print it too")

    demo = commands.add_parser("demo", help="the tutorial's topology on simulated engines, gateway on :8000")
    demo.add_argument("--host", default="127.0.0.1", help="where the gateway listens")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--ttft-ms", type=float, default=50.0)
    demo.add_argument("--itl-ms", type=float, default=20.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        from gateway_app.server import serve_gateway

        return serve_gateway(
            args.config, host=args.host, port=args.port, log_level=args.log_level, keys_file=args.keys_file,
            engine_key_file=args.engine_api_key_file, redis_url=args.redis_url,
            shutdown_grace=args.shutdown_grace_seconds, log_format=args.log_format, access_log=args.access_log,
            otlp_endpoint=args.otlp_endpoint,
        )
    if args.command == "hash-key":
        from gateway_app.auth import generate_key, hash_key

        if args.generate:
            key = generate_key()
            print(f"key:    {key}\nsha256: {hash_key(key)}")
            return 0
        key = args.key if args.key is not None else sys.stdin.readline().strip()
        if not key:
            print("llm-gateway hash-key: no key given", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0
    if args.command == "simulate":
        from gateway_app.simulator import serve_simulator

        return serve_simulator(
            engine=args.engine,
            model=args.model,
            host=args.host,
            port=args.port,
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            log_level=args.log_level,
            api_key=args.api_key,
        )
    from gateway_app.demo import run_demo

    return run_demo(host=args.host, port=args.port, ttft_ms=args.ttft_ms, itl_ms=args.itl_ms)


if __name__ == "__main__":
    sys.exit(main())
