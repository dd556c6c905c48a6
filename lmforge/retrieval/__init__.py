"""Retrieval over local files (issue 15): cut documents into passages that keep their place (file, heading
path, line range) and index them in an embedded SQLite FTS5 database, so answers can cite where they came from.

`chunking` turns one document's text into `Chunk`s; nothing here imports the model, engine or server.
"""
