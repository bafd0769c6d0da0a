"""The append-only audit log of admin and install lifecycle actions."""
