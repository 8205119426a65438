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
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass, field
from typing import Protocol

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
    """The verdict on hives silent for ``silent[hive]`` seconds (every hive of the fleet),
    ``flagged`` stale before, of which ``established`` are established.

    With ``sticky`` a flag stays until the hive's next heartbeat clears it (the redis store,
    where silences restart after a sweeper change); otherwise it follows the silence."""
    stale = {hive for hive, s in silent.items() if s >= settings.stale_after_s}
    if sticky:
        stale |= flagged & silent.keys()
    counted = established & silent.keys()
    return _verdict(silent, stale, flagged, settings, len(counted), counted.__contains__,
                    holding)


def judge_silent(silent: Mapping[str, float], flagged: Set[str], settings: RegistrySettings, *,
                 established_count: int, established: Callable[[str], bool],
                 holding: bool) -> Verdict:
    """``judge`` for a fleet whose every hive silent for ``stale_after_s`` or more is in
    ``silent`` and no other: the same verdict, at the cost of the silent hives alone.
    ``established_count`` counts the fleet's established hives, ``established`` tells one."""
    return _verdict(silent, set(silent), flagged, settings, established_count, established,
                    holding)


def _verdict(silent: Mapping[str, float], stale: set[str], flagged: Set[str],
             settings: RegistrySettings, counted: int, is_counted: Callable[[str], bool],
             holding: bool) -> Verdict:
    verdict = Verdict(holding=holding, stale=stale)
    verdict.newly_stale = sorted(stale - flagged)
    expired = sorted(hive for hive, s in silent.items() if s >= settings.remove_after_s)
    stale_count = sum(1 for hive in stale if is_counted(hive))
    if (expired and counted >= settings.mass_silence_min_hives
            and stale_count > settings.mass_silence_fraction * counted):
        if not holding:
            log.warning("%d of %d established hives are silent at once: suspecting the queens' "
                        "side, removing none of them until they return", stale_count, counted)
        verdict.holding = True
        verdict.held = [hive for hive in expired if is_counted(hive)]
        verdict.expired = [hive for hive in expired if not is_counted(hive)]
    else:
        verdict.holding, verdict.expired = False, expired
    return verdict


class Heard(Protocol):
    """What the bookkeeping reads and writes of a registry entry."""

    received_at: float
    first_seen: float
    stale: bool
    established: bool


class SilenceBook:
    """A registry's sweep, at the cost of its silent hives: the hives in the order they were last
    heard from (so the silent ones come first, and a sweep stops at the first hive heard from
    within ``stale_after_s``), the hives flagged stale, and how many are established, all kept
    as hives report. At 10,000 hives a sweep that measured every hive's silence each second
    held the event loop ~10 ms; this one reads the silent few. (The order is the order of
    ``received_at`` because the registry stamps each heartbeat with its own clock as it takes it;
    a mirror that passes other times does not sweep.)"""

    def __init__(self, settings: RegistrySettings) -> None:
        self.settings = settings
        self.order: dict[str, None] = {}
        """Every hive, the least recently heard from first."""
        self.flagged: set[str] = set()
        self.established = 0
        self.stall = StallRule(settings)
        self.holding = False

    def reported(self, hive_id: str, entry: Heard, replaced: Heard | None) -> None:
        """``entry`` replaced ``replaced`` (None for a new hive), its ``first_seen`` set."""
        entry.established = (entry.received_at - entry.first_seen
                             >= self.settings.established_after_s)
        self.established += entry.established - (replaced.established if replaced else 0)
        self.order.pop(hive_id, None)
        self.order[hive_id] = None
        self.flag(hive_id, entry.stale)

    def flag(self, hive_id: str, stale: bool) -> None:
        (self.flagged.add if stale else self.flagged.discard)(hive_id)

    def forgot(self, hive_id: str, entry: Heard) -> None:
        del self.order[hive_id]
        self.flagged.discard(hive_id)
        self.established -= entry.established

    def clear(self) -> None:
        self.order.clear()
        self.flagged.clear()
        self.established = 0

    def sweep(self, hives: Mapping[str, Heard], now: float
              ) -> tuple[Verdict, dict[str, float], list[str]]:
        """The verdict of a sweep at ``now``, the silences it judged, and the hives whose flag
        it flipped (each entry's ``stale`` follows the verdict): the caller announces
        ``newly_stale`` and removes ``expired``."""
        settings = self.settings
        counted_from = self.stall.restart_from(now)
        if counted_from is not None:  # after a stall every hive's silence restarts: rare
            self.established = 0
            for entry in hives.values():
                entry.received_at = max(entry.received_at, counted_from)
                entry.established = (entry.received_at - entry.first_seen
                                     >= settings.established_after_s)
                self.established += entry.established
        silent: dict[str, float] = {}
        for hive_id in self.order:
            silence = now - hives[hive_id].received_at
            if silence < settings.stale_after_s:
                break
            silent[hive_id] = silence
        verdict = judge_silent(silent, self.flagged, settings,
                               established_count=self.established,
                               established=lambda hive_id: hives[hive_id].established,
                               holding=self.holding)
        self.holding = verdict.holding
        flipped = [*(self.flagged - verdict.stale), *verdict.newly_stale]
        for hive_id in flipped:
            hives[hive_id].stale = hive_id in verdict.stale
        self.flagged = set(verdict.stale)
        return verdict, silent, flipped


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
