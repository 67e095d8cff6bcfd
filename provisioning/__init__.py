"""Device identity, keys and enrollment (filled by the provisioning issue)."""
