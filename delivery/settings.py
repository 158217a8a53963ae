"""
One ``Settings`` object, read from ``DELIVERY_*`` environment variables, built once
at the process edge (the CLI) and passed down; nothing reads the environment later.

``deploy/ENVIRONMENT.md`` documents every variable.
"""

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from delivery.bus.subjects import DEFAULT_SUBJECT_PREFIX
from delivery.datadir import DATABASE_FILE
from delivery.tracing import EXPORTERS

OPS_TOKEN_MIN_LENGTH = 16
"""``DELIVERY_OPS_TOKEN`` guards the operator endpoints of an exposed port: no short ones."""


class Settings(BaseSettings):
    """Configuration of every process kind (run, web, scheduler, dispatcher, handlers)."""

    model_config = SettingsConfigDict(env_prefix="DELIVERY_", extra="ignore")

    # --- core -----------------------------------------------------------------
    data_dir: Path = Field(
        default=Path("./data"),
        description="Where the embedded default keeps its SQLite file and NATS store.",
    )
    database_url: str = Field(
        default="",
        description="SQLAlchemy async URL; empty means SQLite at <data_dir>/delivery.db.",
    )
    nats_url: str = Field(
        default="",
        description="NATS server URL; empty means `delivery run` spawns its own nats-server.",
    )
    subject_prefix: str = Field(
        default=DEFAULT_SUBJECT_PREFIX,
        description="First token of every NATS subject; tests use a unique one per test.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    log_level: str = "INFO"
    log_json: bool | None = Field(
        default=None, description="Force JSON logs (true) or console (false); unset = auto."
    )
    bootstrap_api_key: SecretStr | None = Field(
        default=None,
        description="If set, this key is created at start-up for project `default` (local use).",
    )
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=60)
    auth_cache_ttl_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="How long the API caches a resolved API key: a revoked key keeps "
        "working for at most this long.",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="If set, the /admin/v1 key-management routes accept it as a Bearer "
        "token; unset, those routes do not exist.",
    )
    ops_token: SecretStr | None = Field(
        default=None,
        description="If set, /metrics, /docs, /redoc and /openapi.json require it; unset "
        "leaves them open (local use).",
    )

    ops_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the /health, /ready and /metrics server of `delivery scheduler`, "
        "`dispatcher` and `handlers` (on DELIVERY_HOST); 0 picks a free one, logged at start.",
    )
    otel_exporter: str = Field(
        default="",
        description="`otlp` or `console` turns OpenTelemetry tracing on; empty or `none` "
        "leaves it off.",
    )

    # --- HTTP server (API) ---------------------------------------------------------
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body accepted; a larger one is 413 before anything reads it.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Time a connection has to send a request's headers (from accept, or from "
        "the next request's first byte); then it is closed.",
    )
    body_timeout_s: float = Field(
        default=20.0,
        gt=0,
        description="Time a request has to send its whole body after its headers; then 408.",
    )
    max_connections: int = Field(
        default=16_384,
        ge=1,
        description="Open HTTP connections per process, live streams included; past it a new "
        "connection is answered 503 and closed.",
    )

    # --- scheduler --------------------------------------------------------------
    tick_interval_s: float = Field(default=0.5, gt=0, le=60)
    claim_batch: int = Field(default=1000, ge=1, le=100_000)
    lookahead_s: float = Field(
        default=59.0,
        ge=0,
        le=59,
        description="Fires due within this many seconds are planned and composed ahead, and "
        "shown at their instant (takes scheduler and dispatcher off a burst's critical path); "
        "0 plans at fire time.",
    )
    max_lateness_s: int = Field(
        default=3600,
        ge=0,
        description="Missed fires older than this at catch-up are recorded as skipped.",
    )
    lease_s: int = Field(default=30, ge=1)

    # --- retention ---------------------------------------------------------------
    retention_days: int = Field(
        default=30,
        ge=8,
        le=3650,
        description="Fires, attempts, schedule changes and consumed notifications older than "
        "this are pruned (pending messages never are). At least 8: longer than the stream "
        "keeps a message, so a pruned message cannot be made again from a redelivery.",
    )
    retention_batch: int = Field(
        default=1000, ge=1, le=100_000, description="Rows deleted per table per transaction."
    )
    retention_interval_s: float = Field(
        default=3600.0, gt=0, description="How often the daemon prunes (a backlog drains at once)."
    )

    # --- composer ---------------------------------------------------------------
    composer: str = Field(default="template", description="`template` or `llm`.")
    llm_base_url: str = ""
    llm_model: str = "gpt-4o-mini"
    llm_api_key: SecretStr | None = None
    llm_timeout_s: float = Field(default=20.0, gt=0)
    llm_retry_s: float = Field(
        default=10.0,
        ge=0,
        description="How long a failing LLM call is retried (with backoff) before the "
        "project's template stands in for it.",
    )
    template_cache_s: float = Field(
        default=5.0,
        ge=0,
        description="How long the dispatcher reuses a project's templates and delivery "
        "policy, and the channels worker whether a project has quiet hours, before reading "
        "them again (an update is used by fires and retries after at most this long).",
    )

    # --- webhooks ---------------------------------------------------------------
    secret_key: SecretStr | None = Field(
        default=None,
        description="Key that encrypts webhook secrets at rest; generated into data_dir if unset.",
    )
    webhook_timeout_s: float = Field(default=15.0, gt=0)
    webhook_allow_nets: str = Field(
        default="",
        description="Comma-separated CIDRs exempt from the SSRF guard, e.g. 127.0.0.0/8.",
    )
    webhook_max_in_flight: int = Field(default=256, ge=1)
    webhook_per_endpoint: int = Field(default=32, ge=1)
    webhook_disable_after_s: float = Field(
        default=5 * 86400.0,
        ge=0,
        description="Disable an endpoint that has had no successful attempt for this long "
        "since the first failure of its current streak (0: never).",
    )

    # --- channels ---------------------------------------------------------------
    fcm_service_account_file: Path | None = None
    fcm_base_url: str = "https://fcm.googleapis.com"
    fcm_token_url: str = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret
    smtp_host: str = ""
    smtp_port: int = 587
    smtp_security: str = Field(default="starttls", description="`starttls`, `tls` or `plain`.")
    smtp_username: str = ""
    smtp_password: SecretStr | None = None
    smtp_from: str = ""
    smtp_pool_size: int = Field(
        default=8,
        ge=1,
        description="Most SMTP connections open at once; idle ones are reused for later mail.",
    )
    sms_base_url: str = "https://api.twilio.com"
    sms_account_sid: str = ""
    sms_auth_token: SecretStr | None = None
    sms_from: str = ""
    channel_fallback_after_s: float = Field(
        default=0.0,
        ge=0,
        description="Send a message to one channel at a time, in the user's preference order, "
        "moving on when a channel has not delivered it within this many seconds (0: every "
        "channel at once).",
    )

    @field_validator("otel_exporter")
    @classmethod
    def _known_exporter(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in EXPORTERS:
            raise ValueError(f"must be one of {', '.join(repr(e) for e in EXPORTERS)}")
        return value

    @field_validator("ops_token", "admin_token", mode="before")
    @classmethod
    def _ops_token_long_enough(cls, value: object) -> object:
        # Empty means unset, as for the secret key: an env file can blank a line out.
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is None or text == "":
            return None
        if isinstance(text, str) and len(text) < OPS_TOKEN_MIN_LENGTH:
            raise ValueError(
                f"must be at least {OPS_TOKEN_MIN_LENGTH} characters (e.g. `openssl rand -hex 32`)"
            )
        return value

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a WAL SQLite file inside ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / DATABASE_FILE).resolve()}"
