"""Administrator tools: commands that build, check and publish what readers are given.

:mod:`firmware.admin.credentials` is the ``qrgate credentials`` group (signed credential
snapshots). These run at the administrator's desk or in the back office, never on a reader.
"""
