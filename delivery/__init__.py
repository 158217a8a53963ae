"""Proactive delivery service: schedules, wakeups and trigger events become messages.

Importing this package pins ``zoneinfo`` to the ``tzdata`` package (see
:mod:`delivery.tz`), so every process that touches our code computes the same
instants whatever zone files the host carries.
"""

from delivery.tz import pin_tzdata

__version__ = "0.1.0"

pin_tzdata()
