"""ShadowLLM and DejaVu (``prunekit.strategies.shadowllm``): criteria so far (``criteria``); strategies to come."""
