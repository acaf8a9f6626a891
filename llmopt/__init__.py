"""llmopt: turn a Hugging Face decoder-only LLM into a fast, validated inference artifact."""

__version__ = "0.1.0"
