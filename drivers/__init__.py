"""Hardware drivers: frame sources (camera), status light, buzzer, door relay, pin factories.

Knows nothing of ``firmware``, ``provisioning`` or ``ota``: everything here is usable alone.
"""
