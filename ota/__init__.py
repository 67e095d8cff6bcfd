"""Over-the-air update bundles, updater and rollout (filled by the OTA issue)."""
