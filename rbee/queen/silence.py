"""The rules that turn silences into verdicts, in one place for every store.

Both stores measure each hive's silence on their own clock (the memory store: this queen's; the
redis store: Redis's ``TIME``, one clock for the whole fleet) and ask ``judge`` what follows:
which hives are stale now, which are newly so (to announce once), and which are silent past
``remove_after_s``. If most of the fleet falls silent at once the fault is more likely on the
queens' side (their network, a stall, a sweeper that just moved), so nothing is removed until
that clears, as Kubernetes' node lifecycle controller and Nomad's heartbeat grace do. That guard
counts and holds only *established* hives, those that reported over at least
``established_after_s``: a burst of ids posted once and never again must not outnumber the real
fleet and so stop every removal for good.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from ..config import RegistrySettings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Verdict:
    stale: set[str] = field(default_factory=set)
    """Every hive stale after this sweep."""
    newly_stale: list[str] = field(default_factory=list)
    """Stale now and not before: announced on the stream once."""
    expired: list[str] = field(default_factory=list)
    """To remove with their workers."""
    held: list[str] = field(default_factory=list)
    """Silent past ``remove_after_s`` but kept by the mass-silence guard."""
    holding: bool = False
    """Whether the guard holds removals (kept by the caller for the next sweep's log)."""


def judge(silent: Mapping[str, float], flagged: Set[str], settings: RegistrySettings, *,
          established: Set[str], holding: bool, sticky: bool = False) -> Verdict:
    """The verdict on hives silent for ``silent[hive]`` seconds, ``flagged`` stale before, of
    which ``established`` are established.

    With ``sticky`` a flag stays until the hive's next heartbeat clears it (the redis store,
    where silences restart after a sweeper change); otherwise it follows the silence."""
    verdict = Verdict(holding=holding)
    verdict.stale = {hive for hive, s in silent.items() if s >= settings.stale_after_s}
    if sticky:
        verdict.stale |= flagged & silent.keys()
    verdict.newly_stale = sorted(verdict.stale - flagged)
    expired = sorted(hive for hive, s in silent.items() if s >= settings.remove_after_s)
    counted = established & silent.keys()
    stale_count = len(verdict.stale & counted)
    if (expired and len(counted) >= settings.mass_silence_min_hives
            and stale_count > settings.mass_silence_fraction * len(counted)):
        if not holding:
            log.warning("%d of %d established hives are silent at once: suspecting the queens' "
                        "side, removing none of them until they return",
                        stale_count, len(counted))
        verdict.holding = True
        verdict.held = [hive for hive in expired if hive in counted]
        verdict.expired = [hive for hive in expired if hive not in counted]
    else:
        verdict.holding, verdict.expired = False, expired
    return verdict


class StallRule:
    """The one stall rule of every store's sweeper: a sweep that comes much later than the one
    before (longer than ``stale_after_s``: the queen was stopped, its loop stalled, or it just
    became the sweeper) was not listening, so every hive's silence is counted from one cleanup
    interval ago instead of from its last heartbeat."""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.last: float | None = None
        """When the last sweep ran, on the sweeper's clock (seconds); None before the first."""

    def restart_from(self, now: float) -> float | None:
        """None after an ordinary interval; after a stall, the moment (on the same clock) from
        which every hive's silence is counted."""
        last, self.last = self.last, now
        if last is None or now - last <= self.settings.stale_after_s:
            return None
        log.warning("the queen did not sweep for %.1fs (stalled or suspended); restarting every "
                    "hive's silence count", now - last)
        return now - self.settings.cleanup_interval_s
