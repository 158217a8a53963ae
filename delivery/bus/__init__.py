"""
The NATS JetStream contract every process shares: subject names (:mod:`.subjects`),
message payloads (:mod:`.messages`), the stream (:mod:`.stream`) and the batch
consumer (:mod:`.consumers`). It imports nothing of the store or the processes, so
whoever publishes or consumes depends on it, never on another process.
"""
