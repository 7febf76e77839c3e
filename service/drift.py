"""The HTTP side of drift detection (the statistics live in `service.core.drift`): the Prometheus
collector over the online detectors and the admin-key check for resetting them.

Series (read at scrape time from the `DriftMonitor`, one per model and per ensemble; `kind` is
`model` or `ensemble`):

- `oodflow_drift_statistic{model, kind, tail}`: the CUSUM statistic in nats, tail `upper_tail`
  (low p-values: unusually high OOD scores) or `lower_tail` (p-values near 1: unusually typical
  images, e.g. MNIST under a Fashion-MNIST pixel flow)
- `oodflow_drift_threshold{model, kind}`: the alarm threshold in nats (for the configured run length)
- `oodflow_drift_alarm{model, kind}`: 1 once the detector has alarmed (latched until a reset)
- `oodflow_drift_window_ood_rate{model, kind}`: fraction of `is_ood` among the last window's images
- `oodflow_drift_images{model, kind}`: images seen since the detector's last reset
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.auth import key_matches
from service.core.drift import DriftMonitor
from service.errors import ServiceError, Unauthorized

__all__ = ["DriftCollector", "Forbidden", "require_admin"]


class Forbidden(ServiceError):
    status_code = 403
    code = "forbidden"


class DriftCollector(Collector):
    """Exposes the detectors of `monitor` (None: every family, without samples)."""

    def __init__(self, monitor: DriftMonitor | None = None) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[GaugeMetricFamily]:
        statistic = GaugeMetricFamily(
            "oodflow_drift_statistic",
            "online drift CUSUM statistic (nats) per tail",
            labels=["model", "kind", "tail"],
        )
        threshold = GaugeMetricFamily(
            "oodflow_drift_threshold", "online drift alarm threshold (nats)", labels=["model", "kind"]
        )
        alarm = GaugeMetricFamily(
            "oodflow_drift_alarm", "1 once the online drift detector alarmed", labels=["model", "kind"]
        )
        rate = GaugeMetricFamily(
            "oodflow_drift_window_ood_rate",
            "fraction of OOD verdicts among the last window of served images",
            labels=["model", "kind"],
        )
        images = GaugeMetricFamily(
            "oodflow_drift_images",
            "images seen by the drift detector since its reset",
            labels=["model", "kind"],
        )
        for kind, name, detector in [] if self.monitor is None else self.monitor.items():
            state = detector.state()
            for tail, value in state["statistics"].items():
                statistic.add_metric([name, kind, tail], value)
            threshold.add_metric([name, kind], state["threshold"])
            alarm.add_metric([name, kind], 1.0 if state["alarm"] else 0.0)
            if state["window_ood_rate"] is not None:
                rate.add_metric([name, kind], state["window_ood_rate"])
            images.add_metric([name, kind], state["images"])
        yield from (statistic, threshold, alarm, rate, images)


def _given_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"x-api-key":
            return value.strip()
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip()
    return None


def require_admin(headers: list[tuple[bytes, bytes]], admin_keys: list[bytes], api_keys: list[bytes]) -> None:
    """Raise unless the request may reset state. With admin keys configured one of them is needed;
    with only scoring keys configured, nobody may (a scoring key is not an admin key); with no key
    configured at all, the service is open and so is this."""
    if admin_keys:
        given = _given_key(headers)
        if not given:
            raise Unauthorized(
                "missing admin API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        if not key_matches(given, admin_keys):
            raise Forbidden("this action needs an admin API key (OODFLOW_ADMIN_API_KEYS)")
        return
    if api_keys:
        raise Forbidden("this action needs an admin API key, and none is configured (OODFLOW_ADMIN_API_KEYS)")
