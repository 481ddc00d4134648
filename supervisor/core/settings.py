"""The parts of the config that the machine's rules depend on, and how they are read from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from supervisor.core.condition import Condition

if TYPE_CHECKING:  # the machine imports Settings, and nothing that reads files
    from supervisor.core.config import Config


@dataclass(frozen=True, slots=True)
class Settings:
    """The parts of the config that rules depend on; the drivers hold the rest."""

    backoff_min: float = 1.0
    backoff_max: float = 60.0
    reset_after: float = 10.0
    stop_timeout: float = 10.0
    drain_condition: Condition | None = None
    drain_timeout: float = 0.0
    has_build: bool = False
    reset_on_diverge: bool = False
    releases: bool = False  # deploy.mode = "releases"
    releases_kept: int = 3  # deploy.keep: good releases remembered (and kept on disk)
    health_gate: bool = False  # every start is on probation until healthy
    grace: float = 0.0  # a child on probation must stay up this long
    probe: bool = False  # ... and pass a probe (HealthPassed)
    health_timeout: float = 60.0  # the deadline for both
    overlap: bool = False  # restart.style = "overlap"
    overlap_reserve: int = 0  # bytes that must stay free with both generations running
    fleet: bool = False  # [fleet]: deploys wait for the group's go and one of its slots


def settings_from(config: Config) -> Settings:
    """The machine sees plain values; which config keys matter to the rules is said here once."""
    return Settings(
        backoff_min=config.restart.backoff_min,
        backoff_max=config.restart.backoff_max,
        reset_after=config.restart.reset_after,
        stop_timeout=config.app.stop_timeout,
        drain_condition=config.drain.until if config.drain else None,
        drain_timeout=config.drain.timeout if config.drain else 0.0,
        has_build=config.build is not None,
        reset_on_diverge=config.git.on_diverge == "reset",
        releases=config.releases,
        releases_kept=config.deploy.keep,
        health_gate=config.health is not None,
        grace=config.health.grace if config.health else 0.0,
        probe=config.health is not None and config.health.probe is not None,
        health_timeout=config.health.timeout if config.health else 0.0,  # no gate, no deadline
        overlap=config.restart.style == "overlap",
        overlap_reserve=config.restart.overlap_reserve,
        fleet=config.fleet is not None,
    )
