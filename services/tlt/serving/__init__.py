"""HTTP serving helpers shared by the TLT services: Prometheus metrics and Kubernetes probe endpoints."""
