"""The quality gate: is this a chest radiograph, which view, which way up, before a reader reads it."""
