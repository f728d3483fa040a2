#!/usr/bin/env bash
# Create (or update) the RabbitMQ users of sfx-live's roles and set their permissions. Safe to run again.
#
#   bash scripts/broker-roles.sh [VHOST [NAMESPACE [USER_PREFIX]]]
#
# VHOST      virtual host (else $SFX_BROKER_VHOST, default /)
# NAMESPACE  prefix of every exchange and queue (else $SFX_NAMESPACE, default sfx)
# USER_PREFIX  the users are <prefix>service, <prefix>operator, <prefix>subscriber (else $SFX_ROLE_USER_PREFIX,
#            default sfx-); tests give a prefix of their own so they never touch the real users.
#
# Passwords come from SFX_SERVICE_PASSWORD, SFX_OPERATOR_PASSWORD and SFX_SUBSCRIBER_PASSWORD. Unset, they are the
# development defaults sfx-service-dev, sfx-operator-dev and sfx-subscriber-dev: set real ones in production.
# Passwords are handed to rabbitmqctl on its standard input, never on a command line (ps shows those) or in output.
#
# Permissions are regular expressions on resource names (configure, write, read); ^$ matches nothing:
#   service     ^NS\..*   ^(NS\..*|amq\.default)$   ^NS\..*     everything of the namespace; write on the default
#                          exchange because a queue whose dead-letter exchange is the default one (the retry queues)
#                          may only be declared by a user who may publish there, and `sfx dlq replay` publishes there
#   operator    ^$        ^NS\.control$             ^$          publishes requests to the control exchange, nothing else
#   subscriber  ^NS\.sub\..*  ^NS\.sub\..*          ^(NS\.sub\..*|NS\.results)$
#                          declares and consumes its own queues NS.sub.<name>; binding one to NS.results needs write
#                          on the queue and read on the exchange; it cannot publish to any exchange of sfx-live
# No user gets a tag: none needs the management UI, and no one may set another user's user_id (impersonator).
set -euo pipefail

vhost="${1:-${SFX_BROKER_VHOST:-/}}"
namespace="${2:-${SFX_NAMESPACE:-sfx}}"
prefix="${3:-${SFX_ROLE_USER_PREFIX:-sfx-}}"

if [[ -z "$namespace" || -z "$vhost" ]]; then
  echo "broker-roles: the virtual host and the namespace must not be empty" >&2
  exit 2
fi

# The namespace as a literal inside a regular expression (a test namespace may hold any of these characters).
ns=$(printf '%s' "$namespace" | sed 's/[][\.^$*+?(){}|]/\\&/g')

ctl() { rabbitmqctl --quiet "$@" >/dev/null; }

existing_users=$(rabbitmqctl --quiet list_users --no-table-headers | cut -f1)  # once: each rabbitmqctl takes ~1 s
user_exists() { grep -Fxq -- "$1" <<<"$existing_users"; }

# ensure_user NAME PASSWORD CONFIGURE WRITE READ
ensure_user() {
  local name="$1" password="$2"
  if user_exists "$name"; then
    printf '%s' "$password" | ctl change_password "$name"
  else
    printf '%s' "$password" | ctl add_user "$name"
  fi
  ctl set_user_tags "$name"  # no tags (clears any a previous run or a person gave)
  ctl set_permissions -p "$vhost" "$name" "$3" "$4" "$5"
  echo "broker-roles: $name on vhost $vhost: configure '$3' write '$4' read '$5'"
}

ensure_user "${prefix}service" "${SFX_SERVICE_PASSWORD:-sfx-service-dev}" \
  "^${ns}\\..*" "^(${ns}\\..*|amq\\.default)\$" "^${ns}\\..*"
ensure_user "${prefix}operator" "${SFX_OPERATOR_PASSWORD:-sfx-operator-dev}" \
  '^$' "^${ns}\\.control\$" '^$'
ensure_user "${prefix}subscriber" "${SFX_SUBSCRIBER_PASSWORD:-sfx-subscriber-dev}" \
  "^${ns}\\.sub\\..*" "^${ns}\\.sub\\..*" "^(${ns}\\.sub\\..*|${ns}\\.results)\$"
