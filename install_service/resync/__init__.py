"""Resync runs: move every active install of a template to one release, org by org."""
