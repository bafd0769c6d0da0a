"""The change feed: the outbox lifecycle operations write to, the pull feeds that read it, and
the signed webhooks that push it."""
