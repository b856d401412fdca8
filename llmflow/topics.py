"""Create the topics of the topology with their partitions, retention and compaction."""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from topology.settings import Settings


async def create_topics(settings: Settings) -> list[str]:
    """Create what is missing; returns the names that were created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name=spec.name,
                num_partitions=spec.partitions,
                replication_factor=1,
                topic_configs={
                    "retention.ms": str(spec.retention_ms),
                    "cleanup.policy": "compact" if spec.compacted else "delete",
                },
            )
            for spec in settings.all_topics()
            if spec.name not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
        return [t.name for t in wanted]
    finally:
        await admin.close()
