"""The rules that turn silences into verdicts, in one place for every store.

Both stores measure each hive's silence on their own clock (the memory store: this queen's; the
redis store: Redis's ``TIME``, one clock for the whole fleet) and ask ``judge`` what follows:
which hives are stale now, which are newly so (to announce once), and which are silent past
``remove_after_s``. If most of the fleet falls silent at once the fault is more likely on the
queens' side (their network, a stall, a sweeper that just moved), so nothing is removed until
that clears, as Kubernetes' node lifecycle controller and Nomad's heartbeat grace do.
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
          holding: bool, sticky: bool = False) -> Verdict:
    """The verdict on hives silent for ``silent[hive]`` seconds, ``flagged`` stale before.

    With ``sticky`` a flag stays until the hive's next heartbeat clears it (the redis store,
    where silences restart after a sweeper change); otherwise it follows the silence."""
    verdict = Verdict(holding=holding)
    verdict.stale = {hive for hive, s in silent.items() if s >= settings.stale_after_s}
    if sticky:
        verdict.stale |= flagged & silent.keys()
    verdict.newly_stale = sorted(verdict.stale - flagged)
    expired = sorted(hive for hive, s in silent.items() if s >= settings.remove_after_s)
    if (expired and len(silent) >= settings.mass_silence_min_hives
            and len(verdict.stale) > settings.mass_silence_fraction * len(silent)):
        if not holding:
            log.warning("%d of %d hives are silent at once: suspecting the queens' side, "
                        "removing none until they return", len(verdict.stale), len(silent))
        verdict.holding, verdict.held = True, expired
    else:
        verdict.holding, verdict.expired = False, expired
    return verdict
