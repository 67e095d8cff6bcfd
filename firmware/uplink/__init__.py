"""The MQTT uplink: store-and-forward of the journal, status, telemetry and commands.

``link`` (the MQTT connection, our reconnect loop), ``forwarder`` (journal rows out, PUBACKs
and back-office acks in), ``status`` (birth/will status, telemetry, Home Assistant discovery),
``commands`` (cmd/<name> in, results out), ``service`` (the worker thread that ties them
together), ``identity`` (the device id), ``topics`` (the contract).
"""
