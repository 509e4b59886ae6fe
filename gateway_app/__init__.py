"""llm-gateway: one OpenAI-compatible endpoint in front of vLLM and SGLang engines."""

__version__ = "0.1.0"
