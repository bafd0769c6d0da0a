"""An organization's own schema, item by item: read, create, edit, archive."""
