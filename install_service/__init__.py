"""install-service: installs curated schema templates into organizations and keeps them in sync."""
