#!/bin/sh
# The image's ENTRYPOINT. Seeds the models folder (PHOTOTAG_MODELS_DIR, the /models volume) with
# the built-in default tagger when it has no default.safetensors, then runs the command with exec:
# the server replaces this shell, so it is PID 1 and gets `docker stop`'s SIGTERM itself.
# A default.safetensors already there (your own, or an older image's) is left alone: delete it to
# get this image's default back.
set -eu
builtin="$(dirname "$0")/default.safetensors"
models="${PHOTOTAG_MODELS_DIR:-}"
if [ -n "$models" ] && [ ! -e "$models/default.safetensors" ]; then
    # a hidden temp name of its own, then a rename: the server never sees a half-written file,
    # and pods seeding one shared volume at once (Kubernetes) never write into each other's copy
    if mkdir -p "$models" && tmp="$(mktemp "$models/.default.safetensors.XXXXXX")" \
        && cp "$builtin" "$tmp" && chmod 0644 "$tmp" \
        && mv "$tmp" "$models/default.safetensors"; then
        echo "phototag: copied the built-in default tagger to $models/default.safetensors" >&2
    else
        echo "phototag: cannot write $models/default.safetensors; serving what is there" >&2
    fi
fi
exec "$@"
