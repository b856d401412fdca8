"""The router evaluation: routing policies on checkable zoo tasks (`llmflow eval-router`)."""
