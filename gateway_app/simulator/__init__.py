"""An OpenAI-compatible stand-in for vLLM and SGLang: same endpoints, shapes, errors and metrics.

Used by the tests, the benchmarks, the local demo and GPU-less clusters; the answers are filler
words at a configurable pace (time to first token, inter-token latency).
"""

from gateway_app.simulator.app import SimulatorApp, build_simulator_app
from gateway_app.simulator.server import serve_simulator

__all__ = ["SimulatorApp", "build_simulator_app", "serve_simulator"]
