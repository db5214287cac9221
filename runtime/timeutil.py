"""Docker's RFC 3339 timestamps (nanosecond precision) as unix seconds."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

_RFC3339_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))$"
)
# Go's zero time.Time; Docker reports it for "never started"/"never finished".
_ZERO_YEAR = 1


def parse_docker_time(value: str | None) -> float | None:
    """``"2024-05-01T10:00:00.123456789Z"`` -> unix seconds; zero time or empty -> None."""
    if not value:
        return None
    match = _RFC3339_RE.match(value.strip())
    if match is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    if year == _ZERO_YEAR:
        return None
    fraction = match.group(7) or ""
    tz = timezone.utc
    if match.group(9):
        offset = timedelta(hours=int(match.group(10)), minutes=int(match.group(11)))
        tz = timezone(offset if match.group(9) == "+" else -offset)
    whole = datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()
    # Keep all the digits Docker gives (datetime stops at microseconds).
    return whole + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)
