"""What the queen's and the hive's HTTP servers (and their clients) share.

``app``: JSON apps, replies, errors mapped to statuses by type; ``errors``: ``ApiError``;
``bodies``: request bodies within bounds; ``serving``: an app on hypercorn's trio worker;
``transport``: the connection guard under it (caps, per-phase deadlines); ``auth``: tokens and hive
credentials; ``tls``: certificate files and client verification.
"""

# No imports here: a client (the CLI, the heartbeat sender) that needs ``auth`` or ``tls`` does
# not load the servers' stack with them.
