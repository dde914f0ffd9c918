#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672 with the consistent-hash exchange plugin:
# install it with apt if missing, start it if stopped. Idempotent.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "rabbitmq: not installed; installing with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi

# The plugin list is read at boot and applied live when the node runs (--offline works either way).
rabbitmq-plugins enable --offline rabbitmq_consistent_hash_exchange >/dev/null

if ! port_open; then
  echo "rabbitmq: starting"
  rabbitmq-server -detached
fi
for _ in $(seq 1 60); do
  if port_open && rabbitmqctl -q await_startup >/dev/null 2>&1; then break; fi
  sleep 1
done
port_open || { echo "rabbitmq: not answering on 127.0.0.1:5672" >&2; exit 1; }
# A node that was already running needs the plugin switched on live too.
rabbitmq-plugins enable rabbitmq_consistent_hash_exchange >/dev/null
echo "rabbitmq: up on 127.0.0.1:5672"
