"""
The deployment's JetStream stream: created at start-up by every process that
publishes or consumes, with the duplicate window that makes republishing safe.
"""

import structlog
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from delivery.bus.subjects import DEDUPE_WINDOW_S, Subjects

log = structlog.get_logger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
STREAM_MAX_AGE_S = 7 * 24 * 3600
"""Messages are kept a week: long enough to replay a consumer after an outage."""


def stream_replicas(nc: Client) -> int:
    """
    The stream's replicas for the servers ``nc`` knows: 3 on a cluster of three or
    more, else as many as there are. A clustered server advertises its peers
    (``connect_urls``), which nats-py adds to its pool, so one seed URL is enough.
    Every process computes it the same way, so whichever creates the stream first
    gives it the same replication.
    """
    return max(1, min(3, len(nc.servers)))


async def ensure_stream(
    js: JetStreamContext, subjects: Subjects, *, replicas: int = 1
) -> StreamConfig:
    """
    Create the stream for ``subjects`` if missing, or update its settings if they drifted.

    The duplicate window is what makes the relay (and any republish) idempotent;
    it is always set to :data:`DEDUPE_WINDOW_S`. Safe to call from every process
    at start-up (the scheduler and the dispatcher both do).

    Args:
        js: a JetStream context.
        subjects: the deployment's subjects (stream name and ``<prefix>.>``).
        replicas: stream replicas; 3 on a 3-node cluster, 1 on a single server.

    Returns:
        The stream configuration in force.
    """
    wanted = StreamConfig(
        name=subjects.stream,
        subjects=[subjects.wildcard],
        storage=StorageType.FILE,
        duplicate_window=float(DEDUPE_WINDOW_S),
        max_age=float(STREAM_MAX_AGE_S),
        num_replicas=replicas,
    )
    try:
        info = await js.stream_info(subjects.stream)
    except NotFoundError:
        created = await js.add_stream(wanted)
        log.info("stream_created", stream=subjects.stream, replicas=replicas)
        return created.config
    current = info.config
    if (
        current.duplicate_window != wanted.duplicate_window
        or list(current.subjects or []) != [subjects.wildcard]
        or current.max_age != wanted.max_age
    ):
        # Storage type cannot change in place; keep whatever exists and fix the rest.
        fixed = StreamConfig.from_response(
            {**current.as_dict(), **{k: v for k, v in wanted.as_dict().items() if k != "storage"}}
        )
        updated = await js.update_stream(fixed)
        log.info("stream_updated", stream=subjects.stream)
        return updated.config
    return current
