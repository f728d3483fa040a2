"""The runtime of the services: the bus, the live state in Redis, heartbeats, logging and the service runner."""
