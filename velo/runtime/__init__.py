"""How a daemon runs: the base Daemon (serving), config loading, TLS and tokens (security),
metrics, logs, the health HTTP server, the parent-death lifeline and the MQTT fleet channel.
Knows nothing of caching or learning; imports only velo.v1."""
