"""One backend for the infer stage that hands each call to the driver of its model's kind."""

from __future__ import annotations

from agents.infer import Delta
from schemas.messages import Envelope, Result
from streams.drivers.local_decoder import LocalDecoderBackend
from streams.drivers.openai_http import OpenAIHTTPBackend
from topology.settings import ModelSpec, Settings


class Backends:
    def __init__(self, remote: OpenAIHTTPBackend, local: LocalDecoderBackend) -> None:
        self.remote = remote
        self.local = local

    async def complete(
        self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
    ) -> Result:
        driver = self.local if spec.backend == "onnx" else self.remote
        return await driver.complete(spec, envelope, on_delta)

    async def close(self) -> None:
        await self.remote.close()
        await self.local.close()


def open_backends(settings: Settings) -> Backends:
    remote = OpenAIHTTPBackend(
        settings.provider_url, settings.provider_api_key, settings.infer.max_concurrency
    )
    return Backends(remote, LocalDecoderBackend(settings.engine, settings.models))
