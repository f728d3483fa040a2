#!/usr/bin/env bash
# Create (or update) the Redis ACL users of sfx-live's roles. Safe to run again; never touches Redis's default user.
#
#   bash scripts/redis-roles.sh [NAMESPACE [USER_PREFIX]]
#
# NAMESPACE    prefix of every key (else $SFX_NAMESPACE, default sfx): the users see only keys NAMESPACE:*
# USER_PREFIX  the users are <prefix>service and <prefix>monitor (else $SFX_ROLE_USER_PREFIX, default sfx-)
#
#   service  every command but the server's administration (@dangerous: FLUSHALL, CONFIG, KEYS, ACL, ...) on the
#            namespace's keys; no Pub/Sub channels. Password $SFX_REDIS_SERVICE_PASSWORD (default sfx-service-dev).
#   monitor  read-only commands (@read, without @dangerous) on the namespace's keys, for status pages and
#            `sfx status`. Password $SFX_REDIS_MONITOR_PASSWORD (default sfx-monitor-dev).
#
# Redis is reached as an administrator through $SFX_REDIS_ADMIN_URL (default redis://127.0.0.1:6379, the default
# user). The users then log in with e.g. SFX_REDIS_URL=redis://sfx-service:PASSWORD@127.0.0.1:6379/0.
# A password goes to redis-cli on its standard input (-x), never on a command line (ps shows those) or in output.
# ACL users live in Redis's memory: run this again after a restart (make servers does), unless Redis saves them in
# an ACL file (ACL SAVE).
set -euo pipefail

namespace="${1:-${SFX_NAMESPACE:-sfx}}"
prefix="${2:-${SFX_ROLE_USER_PREFIX:-sfx-}}"
admin_url="${SFX_REDIS_ADMIN_URL:-redis://127.0.0.1:6379}"

if [[ -z "$namespace" ]]; then
  echo "redis-roles: the namespace must not be empty" >&2
  exit 2
fi

# The namespace as a literal inside a key pattern (glob): escape the characters a glob treats specially.
key_pattern="$(printf '%s' "$namespace" | sed 's/[][*?\\]/\\&/g'):*"

# ensure_user NAME PASSWORD RULE...: one ACL SETUSER, so the user is replaced whole (reset first) and atomically.
ensure_user() {
  local name="$1" password="$2"
  shift 2
  if [[ "$name" == "default" ]]; then
    echo "redis-roles: refusing to change Redis's default user" >&2
    exit 2
  fi
  local reply
  reply=$(printf '>%s' "$password" | redis-cli -u "$admin_url" -x ACL SETUSER "$name" reset on "~$key_pattern" \
    resetchannels "$@")
  if [[ "$reply" != "OK" ]]; then
    echo "redis-roles: ACL SETUSER $name failed: $reply" >&2
    exit 1
  fi
  echo "redis-roles: $name on keys $key_pattern: $*"
}

ensure_user "${prefix}service" "${SFX_REDIS_SERVICE_PASSWORD:-sfx-service-dev}" -@all +@all -@dangerous
ensure_user "${prefix}monitor" "${SFX_REDIS_MONITOR_PASSWORD:-sfx-monitor-dev}" -@all +@read +@connection -@dangerous
