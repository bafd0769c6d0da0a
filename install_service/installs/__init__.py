"""The install engine and the install lifecycle built on it."""
