"""Wire contracts: pydantic v2 models for every message llmflow reads or writes."""
