#!/bin/sh
# What the official nginx image's 20-envsubst-on-templates.sh does, for the
# stand-in image: each /etc/nginx/templates/NAME.template becomes
# $NGINX_ENVSUBST_OUTPUT_DIR/NAME, substituting only the variables set in
# the environment whose names match $NGINX_ENVSUBST_FILTER.
set -eu
out="${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}"
filter="${NGINX_ENVSUBST_FILTER:-.}"
vars=$(env | cut -d= -f1 | grep -E "$filter" | sed 's/.*/${&}/' | tr '\n' ' ')
for template in /etc/nginx/templates/*.template; do
    [ -e "$template" ] || continue
    name=$(basename "$template" .template)
    echo "$0: rendering $template to $out/$name"
    envsubst "$vars" < "$template" > "$out/$name"
done
exec "$@"
