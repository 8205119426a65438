"""``rbee top``: the live view of the fleet, from the queen's stream and its history.

``watch`` prints it as text (``--plain``, ``--rounds``, ``rbee up``); ``rbee.top.app`` is the
interactive view (textual), imported only when it runs.
"""

from .feed import FleetFeed, follow_history
from .plain import watch

__all__ = ["FleetFeed", "follow_history", "watch"]
