"""The MQTT uplink: store-and-forward of the journal, status, telemetry and commands."""
