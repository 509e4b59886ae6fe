"""The `llm-gateway` command: `serve`, `simulate`, `hash-key` and `demo`.

These names and flags are a contract: the chart, the docs and the benchmark call them.
"""

from __future__ import annotations

import argparse
import os
import sys

from gateway_app import __version__
from gateway_app.simulator.engine_model import GpuProfile

ENGINE_KINDS = ("vllm", "sglang")
LOG_LEVELS = ("debug", "info", "warning", "error")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" after an option's help, except where there is nothing to show.

    A default of None (the option is off unless given) or a flag's True/False says nothing to a reader,
    so those are left out; an option whose default depends on something else says so in its own help.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-gateway",
        description=__doc__.splitlines()[0],
        formatter_class=_HelpFormatter,
        epilog="`llm-gateway COMMAND --help` lists the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"llm-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary, formatter_class=_HelpFormatter)

    serve = command("serve", "run the gateway")
    serve.add_argument("--config", required=True, metavar="PATH", help="path of the routing map (YAML or JSON)")
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=_env("LLM_GATEWAY_METRICS_PORT"),
        metavar="PORT",
        help="serve /metrics on this port only (and no longer on the API port), for a ServiceMonitor and a "
        "NetworkPolicy that keep it internal; default: /metrics on the API port (env LLM_GATEWAY_METRICS_PORT)",
    )
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="the least severe level logged")
    serve.add_argument(
        "--log-format",
        choices=("json", "text"),
        default=_env("LLM_GATEWAY_LOG_FORMAT"),
        help="json (one object per line) or text; default: text on a terminal, json otherwise "
        "(env LLM_GATEWAY_LOG_FORMAT)",
    )
    serve.add_argument(
        "--otlp-endpoint",
        default=_env("LLM_GATEWAY_OTLP_ENDPOINT"),
        metavar="URL",
        help="send OpenTelemetry traces (OTLP over HTTP) to this collector, e.g. http://otel-collector:4318; "
        "off by default; needs the tracing extra, installed from the checkout: "
        "`.venv/bin/pip install -e '.[tracing]'` (env LLM_GATEWAY_OTLP_ENDPOINT)",
    )
    serve.add_argument(
        "--no-access-log",
        dest="access_log",
        action="store_false",
        help="do not write the one line per request (errors and warnings are still logged)",
    )
    serve.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        default=110.0,
        metavar="SECONDS",
        help="on SIGTERM, stop accepting at once and give requests and streams in flight this long to finish "
        "(keep it below the pod's terminationGracePeriodSeconds minus its preStop wait)",
    )
    serve.add_argument(
        "--keys-file",
        default=_env("LLM_GATEWAY_KEYS_FILE"),
        metavar="PATH",
        help="YAML file of client API keys (sha256 hashes), mounted from a Secret; turns authentication on; "
        "default: no keys, the gateway is open (env LLM_GATEWAY_KEYS_FILE)",
    )
    serve.add_argument(
        "--engine-api-key-file",
        default=_env("LLM_GATEWAY_ENGINE_API_KEY_FILE"),
        metavar="PATH",
        help="file holding the key the gateway sends to engines started with --api-key "
        "(env LLM_GATEWAY_ENGINE_API_KEY_FILE)",
    )
    serve.add_argument(
        "--redis-url",
        default=_env("LLM_GATEWAY_REDIS_URL"),
        metavar="URL",
        help="redis://host:6379/0 to share rate-limit counters between replicas; the password comes from "
        "env LLM_GATEWAY_REDIS_PASSWORD; default: counters in this process's memory (env LLM_GATEWAY_REDIS_URL)",
    )

    simulate = command("simulate", "run an engine simulator (vLLM or SGLang look-alike)")
    simulate.add_argument("--engine", required=True, choices=ENGINE_KINDS, help="the engine to answer like")
    simulate.add_argument("--model", required=True, metavar="ID", help="the model id the simulated engine serves")
    simulate.add_argument("--host", default="0.0.0.0", help="address to listen on")
    simulate.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    simulate.add_argument(
        "--timing",
        default="fixed",
        choices=("fixed", "gpu"),
        help="fixed: every token at the --ttft-ms/--itl-ms pace whatever the load (for overhead benchmarks); "
        "gpu: an engine model with a prefix cache, a batch and a waiting queue (the options below)",
    )
    simulate.add_argument(
        "--ttft-ms", type=float, default=0.0, metavar="MS", help="delay before the first token (--timing fixed)"
    )
    simulate.add_argument(
        "--itl-ms", type=float, default=0.0, metavar="MS", help="delay between two tokens (--timing fixed)"
    )
    gpu = GpuProfile()  # the engine model's defaults: a ~1B model on one mid-range GPU
    simulate.add_argument(
        "--prefill-tokens-per-s",
        type=float,
        default=gpu.prefill_tokens_per_s,
        metavar="N",
        help="prompt tokens computed per second; only tokens missing from the prefix cache cost, and one "
        "prefill runs at a time (--timing gpu)",
    )
    simulate.add_argument(
        "--decode-ms",
        type=float,
        default=gpu.decode_ms,
        metavar="MS",
        help="time per output token when the request runs alone (--timing gpu)",
    )
    simulate.add_argument(
        "--decode-ms-per-running",
        type=float,
        default=gpu.decode_ms_per_running,
        metavar="MS",
        help="extra time per output token for each other running request (--timing gpu)",
    )
    simulate.add_argument(
        "--max-running",
        type=int,
        default=gpu.max_running,
        metavar="N",
        help="requests running at once; more wait in a FIFO queue (--timing gpu)",
    )
    simulate.add_argument(
        "--cache-blocks",
        type=int,
        default=gpu.cache_blocks,
        metavar="N",
        help="KV-cache capacity in blocks, shared by running requests and the prefix cache, least recently "
        "used cached blocks evicted first (--timing gpu)",
    )
    simulate.add_argument(
        "--block-tokens",
        type=int,
        default=gpu.block_tokens,
        metavar="N",
        help="tokens per KV-cache block, like vLLM's --block-size; a token is 4 characters of the prompt "
        "(--timing gpu)",
    )
    simulate.add_argument(
        "--lora-modules",
        "--lora-paths",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters on the model, listed in /v1/models with the model as parent: name=path, or a JSON "
        'object ({"name", "path"} as vLLM takes it, {"lora_name", "lora_path"} as SGLang does)',
    )
    simulate.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="answer the engine's LoRA load and unload endpoints (vLLM: /v1/load_lora_adapter, also with "
        "env VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; SGLang: /load_lora_adapter)",
    )
    simulate.add_argument("--log-level", default="warning", choices=LOG_LEVELS, help="the least severe level logged")
    simulate.add_argument(
        "--api-key",
        metavar="KEY",  # no default from the environment here: --help must not print a secret
        help="require this key on /v1 routes, like vLLM's and SGLang's --api-key; default: no key "
        "(env LLM_GATEWAY_SIMULATOR_API_KEY)",
    )

    hash_key = command("hash-key", "print the sha256 of an API key, for the keys file")
    hash_key.add_argument("key", nargs="?", help="the key (read from standard input when left out)")
    hash_key.add_argument("--generate", action="store_true", help="make a new random key and print it too")

    demo = command("demo", "the tutorial's topology on simulated engines, gateway on :8000")
    demo.add_argument(
        "--host",
        default=_env("LLM_GATEWAY_DEMO_HOST") or "127.0.0.1",
        help="where the gateway listens; 0.0.0.0 to reach it from other machines, as the container image does "
        "(env LLM_GATEWAY_DEMO_HOST)",
    )
    demo.add_argument("--port", type=int, default=8000, help="the gateway's port")
    demo.add_argument("--ttft-ms", type=float, default=50.0, metavar="MS", help="the engines' time to first token")
    demo.add_argument("--itl-ms", type=float, default=20.0, metavar="MS", help="the engines' delay between tokens")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from gateway_app.server import serve_gateway

        return serve_gateway(
            args.config,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            keys_file=args.keys_file,
            engine_key_file=args.engine_api_key_file,
            redis_url=args.redis_url,
            shutdown_grace=args.shutdown_grace_seconds,
            log_format=args.log_format,
            access_log=args.access_log,
            otlp_endpoint=args.otlp_endpoint,
            metrics_port=args.metrics_port,
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

        gpu = None
        if args.timing == "gpu":
            if args.ttft_ms or args.itl_ms:
                parser.error("--ttft-ms and --itl-ms set the fixed timing; the gpu timing has its own options")
            try:
                gpu = GpuProfile(
                    prefill_tokens_per_s=args.prefill_tokens_per_s,
                    decode_ms=args.decode_ms,
                    decode_ms_per_running=args.decode_ms_per_running,
                    max_running=args.max_running,
                    cache_blocks=args.cache_blocks,
                    block_tokens=args.block_tokens,
                )
            except ValueError as error:
                parser.error(str(error))
        from gateway_app.simulator.lora import RUNTIME_UPDATES_ENV, parse_lora_modules, runtime_updates_allowed

        try:
            lora_modules = parse_lora_modules(args.lora_modules)
        except ValueError as error:
            parser.error(f"--lora-modules: {error}")
        runtime_lora = args.allow_runtime_lora_updating or (
            args.engine == "vllm" and runtime_updates_allowed(_env(RUNTIME_UPDATES_ENV))
        )
        return serve_simulator(
            engine=args.engine,
            model=args.model,
            host=args.host,
            port=args.port,
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            log_level=args.log_level,
            api_key=args.api_key or _env("LLM_GATEWAY_SIMULATOR_API_KEY"),
            gpu=gpu,
            lora_modules=lora_modules,
            runtime_lora=runtime_lora,
        )
    from gateway_app.demo import run_demo

    return run_demo(host=args.host, port=args.port, ttft_ms=args.ttft_ms, itl_ms=args.itl_ms)


if __name__ == "__main__":
    sys.exit(main())
