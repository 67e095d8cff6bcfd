"""The reference back office: ingest workers, the event store, reports and a fleet view.

``records`` checks inbound payloads against the contract in :mod:`firmware.uplink.topics`;
``store`` keeps them (SQLite or PostgreSQL, one schema); ``ingest`` runs an MQTT worker that
stores events and publishes acknowledgements; ``report`` counts entries and exits;
``fleet`` reads the readers' retained status; ``mqtt`` holds the broker connection settings.
"""
