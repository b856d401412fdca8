"""Replay of real prompts through the running pipeline (`llmflow eval-replay`)."""
