"""Template documents, publishing and releases."""
