"""Organizations, users, memberships and API tokens."""
