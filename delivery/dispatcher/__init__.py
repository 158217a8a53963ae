"""The NATS JetStream side: subjects, message payloads, subscribers and the composer."""
