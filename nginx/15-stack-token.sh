#!/bin/sh
# nginx image hook (/docker-entrypoint.d, run before the templates are rendered):
# puts the token nginx sends the server with every request (STACK_NGINX_TOKEN,
# a Docker secret file) into $stack_nginx_token. A file readable by root only,
# so the token is in neither the environment nor `docker inspect`.
set -eu
secret="${STACK_NGINX_TOKEN_FILE:-/run/secrets/stack_nginx_token}"
out="${STACK_NGINX_TOKEN_CONF:-/etc/nginx/conf.d/stack-token.conf}"
if [ ! -r "$secret" ]; then
    echo "$0: $secret is missing: deploy with ./stack_deploy.sh, which makes it" >&2
    exit 1
fi
token=$(cat "$secret")
case "$token" in
    "" | *[!A-Za-z0-9_-]*)
        echo "$0: STACK_NGINX_TOKEN must be letters, digits, _ and - only: delete its line in .env and deploy again to generate one" >&2
        exit 1 ;;
esac
umask 077
# shellcheck disable=SC2016 # $stack_nginx_token is nginx's variable, written as it is
printf '# From %s (nginx/15-stack-token.sh).\nmap "" $stack_nginx_token {\n    default "%s";\n}\n' "$secret" "$token" > "$out"
