"""RabbitMQ: queue topology, the event publisher and the Bytewax source."""
