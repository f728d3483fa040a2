"""One settings object for every service, read from environment variables with the prefix ``SFX_``."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Deployment settings. Every field can be set as ``SFX_<FIELD>`` (e.g. ``SFX_AMQP_URL``)."""

    model_config = SettingsConfigDict(env_prefix="SFX_", extra="ignore")

    amqp_url: str = Field("amqp://guest:guest@127.0.0.1:5672//", description="RabbitMQ broker URL")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL for the live state")
    namespace: str = Field(
        "sfx",
        description="Prefix of every exchange, queue and Redis key, so several deployments share one broker",
    )
    prefetch: int = Field(32, ge=1, le=10_000, description="Unacknowledged messages a consumer may hold")
    delivery_limit: int = Field(
        5, ge=1, le=100, description="Deliveries before a message that keeps failing is dead-lettered"
    )
    broker_outage_seconds: float = Field(
        1800.0,
        gt=0,
        le=7 * 24 * 3600,
        description="How long a service or analysis rank keeps retrying a publish while the broker is unreachable",
    )
    queue_max_messages: int = Field(
        50_000,
        ge=100,
        le=10_000_000,
        description="Messages a work queue holds at most; past that the broker refuses publishes and publishers "
        "wait and retry (back-pressure, nothing dropped)",
    )
    retry_delay_seconds: float = Field(
        1.0,
        gt=0,
        le=300,
        description="Wait before a failed message is delivered again; each further retry waits 4× longer (≤ 300 s)",
    )
    heartbeat_seconds: float = Field(5.0, gt=0, description="Period of service status broadcasts")
    state_ttl_seconds: int = Field(
        7 * 24 * 3600, ge=60, description="How long the live state of a run is kept in Redis"
    )
    landing_dirs: list[Path] = Field(default_factory=list, description="Directories the ingest service watches")
    work_dir: Path = Field(Path("/tmp/sfx-live"), description="Where services write outputs and checkpoints")
    merge_update_seconds: float = Field(2.0, gt=0, description="Period of the merger's MergeUpdate messages")
    reservation_nodes: int = Field(1, ge=1, le=10_000, description="Nodes the experiment has reserved")
    ranks_per_node: int = Field(2, ge=1, le=1_000, description="MPI ranks (slots) one reserved node runs")
    burst_slots: int = Field(
        0, ge=0, le=100_000, description="Slots live runs may use beyond the reservation (realtime QOS cap)"
    )
    # Any name here; the dispatcher, its only reader, checks it against its registry of backends at start
    # (services.dispatcher.backends.make_backend): libs may not import services, and a list kept here too would drift.
    backend: str = Field("local", description="Where the dispatcher runs analysis jobs: local (mpiexec on this host)")
    job_min_ranks: int = Field(1, ge=1, le=100_000, description="Fewest ranks a job is started with")
    job_max_ranks: int | None = Field(
        None, ge=1, le=100_000, description="Most ranks one job gets (default: all reserved slots)"
    )
    job_target_seconds: float = Field(
        600.0, gt=0, description="A run of known length gets the ranks that finish it in about this long"
    )
    job_retries: int = Field(2, ge=0, le=20, description="Retries of a failed job before it is reported failed")
    job_retry_backoff_seconds: float = Field(
        15.0, ge=0, description="Wait before the first retry of a failed job; doubles with each retry"
    )
    ingest_poll_seconds: float = Field(1.0, gt=0, description="Period of the landing-directory scan")
    ingest_quiet_seconds: float = Field(
        5.0, gt=0, description="A file that has not changed for this long is complete (when it does not say so)"
    )
    live_timeout_seconds: float = Field(
        600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="A live run that stops growing without completing for this long ends its analysis job (the run "
        "is queued again if it grows later)",
    )
    default_cell: tuple[float, float, float, float, float, float] | None = Field(
        None, description="Cell of runs without a sample.json (JSON list a, b, c, alpha, beta, gamma)"
    )
    default_space_group: str | None = Field(None, description="Space group of runs without a sample.json")
    metrics_port: int = Field(
        9100,
        ge=0,
        le=65_533,  # the merger's offset is 2
        description="HTTP port of /metrics, /healthz and /readyz; each service adds its offset (ingest 0, "
        "dispatcher 1, merger 2) so all three fit on one host; 0 disables the endpoint",
    )
    log_format: str = Field("auto", pattern="^(auto|json|console)$", description="auto: colour on a terminal")
    log_level: str = Field("info", description="debug, info, warning or error")

    def to_environment(self) -> dict[str, str]:
        """``SFX_*`` variables that give a subprocess (a service, an MPI job, ``sfx``) these same settings."""
        environment = {}
        for name, value in self.model_dump(mode="json").items():
            if value is None:
                continue  # unset optional fields keep their default
            text = value if isinstance(value, str) else json.dumps(value)
            environment[f"SFX_{name.upper()}"] = text
        return environment


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def redacted_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, for messages and output (a URL may carry credentials)."""
    from urllib.parse import urlsplit  # local: this helper is the file's only user

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user_info, _, host = parts.netloc.rpartition("@")
    user = user_info.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
