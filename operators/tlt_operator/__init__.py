"""Kubernetes operator for the RLJob custom resource (kopf); see DESIGN.md, Kubernetes."""
