"""Connectors to the outside: RabbitMQ, Qdrant, files and the change-data-capture sources."""
