"""Prometheus metrics, Grafana dashboards and Prometheus config for fluidserve."""
from monitoring.metrics import ServingMetrics

__all__ = ["ServingMetrics"]
