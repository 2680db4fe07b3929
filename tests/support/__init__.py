"""What several test modules share: deployments, receivers, records made by hand, probes."""
