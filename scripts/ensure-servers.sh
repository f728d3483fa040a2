#!/usr/bin/env bash
# Make sure RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379) answer; install and start them if needed.
set -euo pipefail

command -v redis-server >/dev/null && command -v rabbitmq-server >/dev/null || bash "$(dirname "$0")/install-system-packages.sh"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! port_open 5672; then
  rabbitmq-server -detached
fi

for _ in $(seq 1 120); do
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && port_open 5672 \
     && rabbitmqctl -q status >/dev/null 2>&1; then
    echo "servers: redis and rabbitmq answer"
    exit 0
  fi
  sleep 1
done
echo "servers: RabbitMQ or Redis did not come up within 120 s" >&2
exit 1
