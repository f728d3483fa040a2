"""One settings object for every service, read from environment variables with the prefix ``SFX_``."""

from __future__ import annotations

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
    heartbeat_seconds: float = Field(5.0, gt=0, description="Period of service status broadcasts")
    state_ttl_seconds: int = Field(
        7 * 24 * 3600, ge=60, description="How long the live state of a run is kept in Redis"
    )
    landing_dirs: list[Path] = Field(default_factory=list, description="Directories the ingest service watches")
    work_dir: Path = Field(Path("/tmp/sfx-live"), description="Where services write outputs and checkpoints")
    merge_update_seconds: float = Field(2.0, gt=0, description="Period of the merger's MergeUpdate messages")
    analysis_ranks: int = Field(
        2, ge=1, le=100_000, description="MPI ranks of one analysis job (first-form dispatcher)"
    )
    ingest_poll_seconds: float = Field(1.0, gt=0, description="Period of the landing-directory scan")
    ingest_quiet_seconds: float = Field(
        5.0, gt=0, description="A file that has not changed for this long is complete (when it does not say so)"
    )
    default_cell: tuple[float, float, float, float, float, float] | None = Field(
        None, description="Cell of runs without a sample.json (JSON list a, b, c, alpha, beta, gamma)"
    )
    default_space_group: str | None = Field(None, description="Space group of runs without a sample.json")
    log_format: str = Field("auto", pattern="^(auto|json|console)$", description="auto: colour on a terminal")
    log_level: str = Field("info", description="debug, info, warning or error")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
