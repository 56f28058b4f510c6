"""The kinds of artifact a job publishes to its store: one name each, for publishers, loaders and exports."""

POLICY_KIND = "policy"
DRAFTER_KIND = "drafter"
