"""The `llm-gateway` command: `serve`, `simulate` and `demo`.

These names and flags are a contract: the chart, the docs and the benchmark call them.
"""

from __future__ import annotations

import argparse
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

    simulate = commands.add_parser("simulate", help="run an engine simulator (vLLM or SGLang look-alike)")
    simulate.add_argument("--engine", required=True, choices=ENGINE_KINDS)
    simulate.add_argument("--model", required=True, help="the model id the simulated engine serves")
    simulate.add_argument("--host", default="0.0.0.0")
    simulate.add_argument("--port", type=int, default=8000)
    simulate.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first token")
    simulate.add_argument("--itl-ms", type=float, default=0.0, help="delay between two tokens")
    simulate.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))

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

        return serve_gateway(args.config, host=args.host, port=args.port, log_level=args.log_level)
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
        )
    from gateway_app.demo import run_demo

    return run_demo(host=args.host, port=args.port, ttft_ms=args.ttft_ms, itl_ms=args.itl_ms)


if __name__ == "__main__":
    sys.exit(main())
