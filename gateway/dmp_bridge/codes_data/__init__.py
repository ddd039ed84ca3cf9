"""ANS value sets and concept maps the DMP bridge derives XDS metadata from, as data (see SOURCES.md)."""
