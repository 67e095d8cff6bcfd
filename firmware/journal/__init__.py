"""The journal: a durable SQLite (WAL) outbox, the one place every scan lands."""
