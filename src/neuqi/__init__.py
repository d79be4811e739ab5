"""NeUQI: streaming, resumable uniform quantization of LLMs."""
